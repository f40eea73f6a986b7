import json
import subprocess
import sys

import numpy as np
import pytest

from subquad_ds.cli import ProgressBar, build_parser, fit_exponent, main


def test_train_writes_history_and_plot(tmp_path, capsys):
    rc = main(["train", "--width", "128", "--iters", "4", "--n-samples", "8", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "sparse" in out and "dense" in out and "speedup" in out
    assert "threads: sparse kernels 1, dense reference 1 BLAS thread(s)" in out
    history = json.loads((tmp_path / "subquad_ds_train.json").read_text())
    for backend in ("sparse", "dense"):
        h = history["history"][backend]
        assert len(h["loss"]) == len(h["time"]) == 4
        assert all(np.isfinite(h["loss"]))
    png = (tmp_path / "subquad_ds_train.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    rc = main(["train", "--width", "64", "--iters", "2", "--n-samples", "4", "--sparse-only",
               "--out", str(tmp_path)])
    assert rc == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "subquad_ds_train.png").exists()


def test_bench_prints_exponent(capsys):
    rc = main(["bench", "--widths", "64,128", "--iters", "2", "--n-samples", "4", "--backend", "sparse"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fitted exponent of sparse time vs m over 64..128" in out


def test_fit_exponent_recovers_power_law():
    m = np.array([1024, 2048, 4096, 8192])
    assert fit_exponent(m, 3e-9 * m ** 1.5) == pytest.approx(1.5)


@pytest.mark.parametrize("argv, message", [
    (["train", "--width", "0"], "must be >= 1"),
    (["train", "--sparsity", "1.5"], "must be 'sqrt-log'"),
    (["bench", "--widths", "a,b"], "comma-separated integers"),
])
def test_bad_arguments_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_sparsity_forms():
    parse = build_parser().parse_args
    assert parse(["train", "--sparsity", "0.05"]).sparsity == 0.05
    assert parse(["train", "--sparsity", "64"]).sparsity == 64
    assert parse(["train"]).sparsity == "sqrt-log"


def test_progress_bar_non_interactive(tmp_path):
    with open(tmp_path / "log.txt", "w") as stream:
        bar = ProgressBar(20, "sparse", stream=stream)
        for i in range(20):
            assert bar(i, 1.0 / (i + 1)) is False
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("sparse [####") and "20/20" in lines[-1]


def test_python_dash_m_is_the_same_program():
    res = subprocess.run([sys.executable, "-m", "subquad_ds", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "train" in res.stdout and "bench" in res.stdout


def test_dense_reference_gets_the_same_blas_threads(monkeypatch):
    from threadpoolctl import threadpool_info

    from subquad_ds.cli import blas_thread_limit

    def blas_threads():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    before = blas_threads()
    limit, text = blas_thread_limit(1)
    assert text == "1 BLAS thread(s)"
    assert blas_threads() == before          # asking for the description limits nothing
    with limit:
        assert all(t == 1 for t in blas_threads())
    assert blas_threads() == before
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    limit, text = blas_thread_limit(1)
    assert "threadpoolctl is not installed" in text
    with limit:
        pass
