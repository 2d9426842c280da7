"""The study's progress line and the context every trial receives, without starting Ray: the line shows the
registry's headline metrics with the study's primary metric first; the context (and the parsed study a search
trial needs) pickles into a Ray worker."""

import pickle
from types import SimpleNamespace

import cloudpickle
import pytest

from srdit.runtime.driver import _progress_callback, progress_line
from srdit.runtime.worker import TrialContext
from srdit.study.spec import study_from_dict


def _lines(result: dict, primary: str) -> list[str]:
    out: list[str] = []
    cb = _progress_callback(4, 1, out.append, primary)
    cb.on_trial_complete(0, [], SimpleNamespace(last_result=result, trial_id="t0"))
    return out


def test_imagenet_progress_line_shows_fid_first():
    r = {
        "trial_key": "01-s0-ab12",
        "status": "finished",
        "reason": "",
        "step": 400,
        "fid": 41.25,
        "sfid": 9.0,
        "inception_score": 30.0,
        "loss": 0.4321,
        "images_per_s": 812.0,
        "trial_wall_s": 95.2,
        "run_id": "abc",
    }
    (line,) = _lines(r, "fid")
    assert line.startswith("[2/4] 01-s0-ab12: finished  fid 41.25  loss 0.4321  images_per_s 812  95 s")
    assert "fd " not in line and "sfid" not in line


def test_digits_progress_line_shows_fd_loss_and_throughput():
    r = {
        "trial_key": "10-s1-cd34",
        "status": "diverged",
        "reason": "non-finite loss",
        "step": 6,
        "fd": 12.3456,
        "kd": 0.1,
        "loss": 1.5,
        "images_per_s": 2000.0,
        "trial_wall_s": 4.0,
    }
    (line,) = _lines(r, "fd")
    assert line == ("[2/4] 10-s1-cd34: diverged (non-finite loss)  fd 12.35  loss 1.5  images_per_s 2000  4 s")


def test_primary_metric_leads_and_missing_metrics_are_left_out():
    r = {"status": "crashed", "reason": "ValueError: x", "images_per_s": 5.0, "fd": float("nan"), "cached": 1}
    line = progress_line(3, 3, "k", r, "images_per_s")
    assert line == "[3/3] k: crashed (ValueError: x)  images_per_s 5  fd nan  0 s"
    assert progress_line(1, 2, "k", {"status": "finished"}, "fid") == "[1/2] k: finished    0 s"


def test_excluded_search_sample_is_not_counted():
    out: list[str] = []
    cb = _progress_callback(3, 0, out.append, "fd")
    cb.on_trial_complete(0, [], SimpleNamespace(last_result={"status": "excluded", "reason": "needs x"}, trial_id="t"))
    cb.on_trial_complete(0, [], SimpleNamespace(last_result={"status": "finished", "fd": 1.0}, trial_id="t1"))
    assert out == ["  search sample excluded: needs x", "[1/3] t1: finished  fd 1  0 s"]


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_trial_context_with_the_parsed_search_study_pickles(dumps):
    spec = study_from_dict(
        {
            "name": "s",
            "techniques": ["rmsnorm", "qk_norm"],
            "seeds": [0],
            "design": {
                "kind": "search",
                "trials": 2,
                "objectives": ["fd"],
                "space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
            },
        }
    )
    ctx = TrialContext(
        study="s",
        design="search",
        factors=tuple(spec.factor_names),
        uri="sqlite:///x.db",
        experiment_id="1",
        parent_run_id="p",
        trials_dir="trials",
        spec=spec,
        objectives=("fd",),
    )
    back = pickle.loads(dumps(ctx))
    assert back == ctx and back.spec == spec and back.spec.design.space == spec.design.space
    with pytest.raises(AttributeError):
        back.study = "other"  # frozen


@pytest.mark.parametrize(
    "exc, code, printed", [("SystemExit(1)", 1, False), ("SystemExit(0)", 0, False), ("ValueError('boom')", None, True)]
)
def test_a_worker_sigterm_inside_a_callback_ends_quietly(exc, code, printed):
    """Ray's SIGTERM handler raises SystemExit; raised inside a weakref callback, Python prints "Exception ignored
    in ..." with a traceback on the driver's console and goes on. In a trial worker that SystemExit ends the
    process with its code and prints nothing; any other unraisable error is still printed."""
    import subprocess
    import sys
    import textwrap

    code_text = textwrap.dedent(f"""
        import gc, weakref
        from srdit.runtime.worker import quiet_exit_on_sigterm
        quiet_exit_on_sigterm()
        class A: pass
        def cb(_):
            raise {exc}
        a = A(); r = weakref.ref(a, cb); del a; gc.collect()
        print("carried on")
    """)
    run = subprocess.run([sys.executable, "-c", code_text], capture_output=True, text=True, timeout=120)
    if code is None:
        assert run.returncode == 0 and "carried on" in run.stdout
        assert "Exception ignored in" in run.stderr and "boom" in run.stderr
    else:
        assert run.returncode == code and "carried on" not in run.stdout
        assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
    assert printed == ("Traceback" in run.stderr)
