"""What the ``solar-ray`` shell prints when things go wrong: argparse errors on one line,
help text as written, ``push`` without a network in one line, and a signal at any moment of
start-up stopping the command with one line and exit 128 + signal (no traceback)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "solar_ray.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env or dict(os.environ))  # fmt: skip


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["upscale", "--bogus"], "solar-ray upscale: error: unrecognized arguments: --bogus"),
        (["upscale", "--m", "x"], "solar-ray upscale: error: argument --m: invalid int value: 'x'"),
        (["run"], "solar-ray run: error: the following arguments are required: recipe"),
    ],
)
def test_argparse_errors_are_one_line_and_exit_2(args, line):
    """They printed a 10-line usage block before the error."""
    r = _cli(*args)
    assert r.returncode == 2
    prog = line.split(": error:")[0]
    assert r.stderr == f"{line} (see {prog} --help)\n"
    assert r.stdout == ""


def test_an_unknown_command_is_one_line():
    r = _cli("upscal")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("solar-ray: error: argument COMMAND: invalid choice: 'upscal'")
    assert r.stderr.endswith("(see solar-ray --help)\n")


def test_a_commands_help_shows_its_description_as_written():
    """``contamination --help`` showed ``Min-K%% Prob`` (the %-escaped help string)."""
    r = _cli("contamination", "--help")
    assert r.returncode == 0
    assert "\nMin-K% Prob and n-gram contamination checks\n" in r.stdout and "%%" not in r.stdout


def test_push_without_a_network_is_one_line(tmp_path):
    """It was a 70-line connection-error traceback."""
    with socket.socket() as s:  # a closed loopback port: nothing leaves this host
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = tmp_path / "model"
    model.mkdir()
    (model / "solar.json").write_text(json.dumps({"stage": "upscale"}))
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_dummy",
           "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "5"}  # fmt: skip
    r = _cli("push", str(model), "me/tiny", env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(
        "solar-ray push: error: push to me/tiny: the Hub refused or could not be reached ("
    )
    assert sorted(p.name for p in model.iterdir()) == ["solar.json"]


#: the child announces itself just before ``main`` runs: the interpreter's own start-up
#: (before any solar-ray code can run) is not what is tested
_CHILD = "import sys; from solar_ray.cli import main; print('ready', flush=True); sys.exit(main())"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_stops_with_one_line(signum):
    """A signal while the command's module is imported (``pretrain`` imports for about 0.3 s,
    more under load) was a KeyboardInterrupt traceback or a bare kill: the handlers were
    installed only once the command's arguments were parsed."""
    name = signal.Signals(signum).name
    stopped = 0
    for delay_s in (0.005, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3):
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, "pretrain", "--help"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert proc.stdout.readline() == "ready\n"
            time.sleep(delay_s)
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert "Traceback" not in err, (delay_s, err)
        done = out.startswith("usage: solar-ray pretrain")  # the help was printed: it finished
        # a signal in the interpreter's own shutdown, after the command, kills it (-signum)
        allowed = (0, -signum, 128 + signum) if done else (128 + signum,)
        assert proc.returncode in allowed, (delay_s, proc.returncode, err)
        if proc.returncode == 128 + signum:  # else it had finished before the signal came
            assert err.splitlines()[-1] == f"solar-ray pretrain: stopped by {name}; partial outputs were removed"
            stopped += 1
    assert stopped >= 2


@pytest.mark.parametrize("wrapper", [RuntimeError, ValueError])
def test_a_signal_wrapped_by_a_library_still_stops_with_one_line(monkeypatch, capsys, wrapper):
    """pydantic, building a validator when SIGTERM came, raised its SchemaError around our
    exception (a traceback); a library's ValueError became a config error (exit 2)."""
    from solar_ray import cli
    from solar_ray.cli import main
    from solar_ray.config import ConfigError

    def run(kind, args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        except KeyboardInterrupt as e:  # what the library does with it
            error = ConfigError if wrapper is ValueError else wrapper
            raise error(f"Error building validator: {type(e).__name__}: {e}") from e
        pytest.fail("SIGTERM did not arrive")

    monkeypatch.setattr(cli, "run_stage_command", run)
    capsys.readouterr()
    assert main(["upscale"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "solar-ray upscale: stopped by SIGTERM; partial outputs were removed\n"
