"""`python -m srdit` (e.g. under torchrun: `torchrun --nproc-per-node 8 -m srdit train ...`)."""

import sys

from srdit.commands import main

sys.exit(main())
