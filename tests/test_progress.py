"""Progress: plain periodic lines outside a terminal, a tqdm bar in one; upscale and merge
report what they wrote."""

from __future__ import annotations

import logging

import pytest

from solar_ray.progress import Progress


def test_plain_lines_say_done_total_rate_and_eta(monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 40.0])
    monkeypatch.setattr("solar_ray.progress.time.monotonic", lambda: next(clock))
    lines: list[str] = []
    p = Progress("cpt", 100, "steps", terminal=False, interval_s=5, emit=lines.append)
    p.set(25)  # t=10: 25 steps in 10 s
    assert lines == ["cpt:  25% 25/100 [00:10<00:30,  2.50steps/s]"]
    p.set(50)  # t=20
    assert lines[-1] == "cpt:  50% 50/100 [00:20<00:20,  2.50steps/s]"
    p.close()  # t=40: the last line, whatever the interval
    assert lines[-1] == "cpt:  50% 50/100 [00:40<00:40,  1.25steps/s]" and len(lines) == 3
    # a resumed run's rate and ETA count only the steps done since it started
    clock = iter([0.0, 10.0])
    resumed: list[str] = []
    Progress("cpt", 100, "steps", terminal=False, initial=40, interval_s=5, emit=resumed.append).set(60)
    assert resumed == ["cpt:  60% 60/100 [00:10<00:20,  2.00steps/s]"]


def test_bytes_and_unknown_totals_and_quiet_intervals():
    lines: list[str] = []
    p = Progress("upscale", 3 << 30, "B", terminal=False, interval_s=3600, emit=lines.append)
    p.update(1 << 30)
    assert lines == []  # within the interval: nothing yet
    p.close()
    assert lines[0].startswith("upscale:  33% 1.00G/3.00G [")
    rows: list[str] = []
    with Progress("data", None, "rows", terminal=False, interval_s=0, emit=rows.append) as q:
        q.update(1200)
    assert rows[0].startswith("data: 1200rows [")
    # work that fails says nothing more: the failed command's error stays its one line
    failed: list[str] = []
    with pytest.raises(RuntimeError), Progress("merge", 4, "tensors", terminal=False,
                                               interval_s=3600, emit=failed.append) as f:
        f.update(2)
        raise RuntimeError("boom")
    assert failed == []


def test_terminal_gets_a_tqdm_bar(capsys):
    with Progress("merge", 4, "tensors", terminal=True) as p:
        for _ in range(4):
            p.update()
    err = capsys.readouterr().err
    assert "merge" in err and "4/4" in err


def test_upscale_logs_the_bytes_it_wrote(tmp_path, tiny_llama_dir, caplog):
    from solar_ray.upscale import UpscaleConfig, run_upscale

    caplog.set_level(logging.INFO, logger="solar_ray.progress")
    run_upscale(UpscaleConfig(source=str(tiny_llama_dir), m=1, out=str(tmp_path / "up")))
    lines = [r.getMessage() for r in caplog.records if r.name == "solar_ray.progress"]
    assert lines and lines[-1].startswith("upscale: ") and " 100% " in lines[-1]


@pytest.mark.parametrize("method", ["linear"])
def test_merge_logs_the_tensors_it_wrote(tmp_path, tiny_llama_dir, caplog, method):
    from solar_ray.merge import MergeConfig, run_merge

    caplog.set_level(logging.INFO, logger="solar_ray.progress")
    run_merge(MergeConfig(method=method, models=[str(tiny_llama_dir), str(tiny_llama_dir)],
                          out=str(tmp_path / "merged")))  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.name == "solar_ray.progress"]
    assert lines and lines[-1].startswith("merge: 100% ") and "tensors/s]" in lines[-1]
