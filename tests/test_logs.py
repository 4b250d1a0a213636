"""Daemon logs (journald-friendly lines, request ids) and `appliance logs`."""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import threading

import httpx
import pytest

from appliance.config import parse_config
from appliance.logs import OncePer, bind_request_id, setup_logging
from appliance.logview import journal_command

from .conftest import PY, ROOT, fake_model, wait_until


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        h.close()
    root.handlers[:], root.level = handlers, level


def _log_through(tmp_path, monkeypatch, journal: bool):
    out = tmp_path / "stderr.txt"
    stream = out.open("w")
    if journal:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    else:
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # some other stream's: not ours
    setup_logging("info", stream=stream)
    log = logging.getLogger("appliance.test")
    log.info("plain")
    log.warning("two\nlines")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    stream.close()
    return out.read_text().splitlines()


def test_lines_carry_journald_priorities_when_stderr_is_the_journal(tmp_path, monkeypatch,
                                                                    restore_logging):
    lines = _log_through(tmp_path, monkeypatch, journal=True)
    assert lines[0] == "<6>INFO appliance.test: plain"
    assert lines[1] == "<4>WARNING appliance.test: two\\nlines"
    # A traceback stays one event on one line.
    assert len(lines) == 3 and lines[2].startswith("<3>ERROR appliance.test: failed\\nTraceback")
    assert "ValueError: boom" in lines[2]


def test_off_the_journal_lines_have_no_priority_prefix_and_no_colour(tmp_path, monkeypatch,
                                                                     restore_logging):
    lines = _log_through(tmp_path, monkeypatch, journal=False)
    assert lines[0] == "INFO appliance.test: plain"
    assert not any("\x1b[" in line for line in lines)


def test_a_log_line_carries_the_request_id_of_its_task_only(tmp_path, monkeypatch, restore_logging):
    import asyncio

    out = tmp_path / "stderr.txt"
    stream = out.open("w")
    setup_logging("info", stream=stream)
    log = logging.getLogger("appliance.test")

    async def request(rid):
        bind_request_id(rid)
        await asyncio.sleep(0)
        log.warning("in %s", rid)

    async def main():
        await asyncio.gather(asyncio.create_task(request("r1")), asyncio.create_task(request("r2")))
        log.warning("outside")

    asyncio.run(main())
    stream.close()
    assert sorted(out.read_text().splitlines()) == [
        "WARNING appliance.test [req r1]: in r1", "WARNING appliance.test [req r2]: in r2",
        "WARNING appliance.test: outside"]


def test_the_daemon_logs_the_request_id_of_a_broken_stream(daemons):
    daemon = daemons.start(fake_model("slow", "--chunks", "200", "--chunk-delay", "0.05"),
                           server='log_file = "daemon.log"')
    (engine_pid,) = daemon.engine_pids
    with httpx.stream("POST", f"{daemon.url}/v1/chat/completions", timeout=30,
                      headers={"X-Request-Id": "trace-me-42"},
                      json={"model": "slow", "stream": True, "messages": [{"role": "user", "content": "x"}]}
                      ) as resp:
        chunks = resp.iter_bytes()
        next(chunks)
        os.kill(engine_pid, 9)  # the engine dies mid-answer: the proxy logs it
        for _ in chunks:
            pass
    log_file = daemons.tmp / "log" / "daemon.log"
    line = wait_until(lambda: next((x for x in log_file.read_text().splitlines() if "broke" in x), None),
                      timeout=10, what="the broken-stream warning")
    assert "WARNING appliance.proxy [req trace-me-42]: stream from slow#0 broke" in line
    # The replica's owner task is not the request: its lines carry no request id.
    wait_until(lambda: "READY -> BACKOFF" in log_file.read_text(), timeout=10, what="the crash")
    assert all("[req" not in x for x in log_file.read_text().splitlines() if "replica slow#0" in x)


def _appliance(*args, **kw):
    return subprocess.run([PY, "-m", "appliance.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, **kw)


def test_appliance_logs_shows_the_daemon_log_file_and_a_replica_log(daemons):
    daemon = daemons.start(fake_model("fake"), server='log_file = "daemon.log"')
    shown = _appliance("logs", "--no-follow", "--config", str(daemon.config))
    assert shown.returncode == 0, shown.stderr
    assert "INFO appliance.api: serving fake on" in shown.stdout
    replica = _appliance("logs", "--replica", "fake#0", "--no-follow", "--config", str(daemon.config))
    assert replica.returncode == 0, replica.stderr
    assert "--- appliance: starting" in replica.stdout  # the supervisor's first line in the engine log
    missing = _appliance("logs", "--replica", "nope#3", "--no-follow", "--config", str(daemon.config))
    assert missing.returncode != 0 and "no replica log for 'nope#3'" in missing.stderr
    assert "fake#0" in missing.stderr  # names the logs that exist


def test_appliance_logs_without_a_log_file_or_systemd_says_what_to_do(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[paths]\nlog_dir = "{tmp_path}/log"\n')
    result = _appliance("logs", "--no-follow", "--config", str(cfg))
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("systemd runs here: appliance logs reads the journal")
    assert result.returncode == 1 and "set server.log_file" in result.stderr


def test_under_systemd_the_daemon_log_is_the_journal(tmp_path):
    booted = tmp_path / "run-systemd-system"
    assert journal_command(20, True, systemd_dir=booted) is None
    booted.mkdir()
    argv = journal_command(20, True, systemd_dir=booted)
    if argv is None:
        pytest.skip("journalctl is not installed")
    assert argv == ["journalctl", "-u", "appliance.service", "-n", "20", "-f"]
    assert journal_command(5, False, systemd_dir=booted)[-1] == "--no-pager"


def test_following_a_replica_log_survives_rotation(tmp_path):
    cfg_path = tmp_path / "a.toml"
    cfg_path.write_text(f'[paths]\nlog_dir = "{tmp_path}/log"\n')
    replicas = tmp_path / "log" / "replicas"
    replicas.mkdir(parents=True)
    log = replicas / "m-0.log"
    log.write_text("old line\n" * 3 + "last before\n")
    assert parse_config(cfg_path.read_text()).paths.log_dir == f"{tmp_path}/log"
    proc = subprocess.Popen([PY, "-m", "appliance.cli", "logs", "--replica", "m", "-n", "2",
                             "--config", str(cfg_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x.rstrip("\n")) for x in proc.stdout], daemon=True).start()
    try:
        assert [lines.get(timeout=30), lines.get(timeout=30)] == ["old line", "last before"]
        with log.open("a") as f:
            f.write("appended\n")
        assert lines.get(timeout=30) == "appended"
        os.replace(log, log.with_name("m-0.log.1"))  # what the supervisor's capped log does
        with log.open("w") as f:
            f.write("after rotation\n")
        assert lines.get(timeout=30) == "after rotation"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_appliance_logs_shows_control_characters_an_engine_logged_without_the_terminal_obeying_them(tmp_path):
    cfg_path = tmp_path / "a.toml"
    cfg_path.write_text(f'[paths]\nlog_dir = "{tmp_path}/log"\n')
    (tmp_path / "log" / "replicas").mkdir(parents=True)
    # What vLLM logs of a client's prompt: a title change, a screen clear, a clipboard write.
    prompt = "Received request: prompt='hi\x1b]0;owned\x07\x1b[2J\x1b]52;c;ZXZpbA==\x07\x9b31m'\tdone"
    (tmp_path / "log" / "replicas" / "m-0.log").write_text(prompt + "\n")
    shown = _appliance("logs", "--replica", "m", "--no-follow", "--config", str(cfg_path))
    assert shown.returncode == 0, shown.stderr
    assert not any(c in shown.stdout for c in "\x1b\x07\x9b")
    assert "hi\\x1b]0;owned\\x07\\x1b[2J" in shown.stdout and "\tdone" in shown.stdout


def test_appliance_logs_refuses_a_negative_line_count_instead_of_printing_nothing(tmp_path):
    cfg_path = tmp_path / "a.toml"
    cfg_path.write_text(f'[paths]\nlog_dir = "{tmp_path}/log"\n')
    (tmp_path / "log" / "replicas").mkdir(parents=True)
    (tmp_path / "log" / "replicas" / "m-0.log").write_text("a line\n")
    shown = _appliance("logs", "--replica", "m", "-n", "-5", "--no-follow", "--config", str(cfg_path))
    assert shown.returncode == 2 and "'-n' / '--lines'" in shown.stderr and "Traceback" not in shown.stderr


def test_a_recurring_refusal_is_logged_once_per_reason_then_with_its_count(caplog):
    now = [0.0]
    once = OncePer(60.0, clock=lambda: now[0])
    logger = logging.getLogger("appliance.test")
    with caplog.at_level(logging.INFO, logger="appliance.test"):
        for i in range(5):  # the same reason, its numbers changing: one line
            once.log(logger, logging.INFO, f"refused: no room, retry in {i}s")
        once.log(logger, logging.INFO, "refused: queue full")  # another reason: its own line
        now[0] = 61.0
        once.log(logger, logging.INFO, "refused: no room, retry in 9s")
    assert [r.getMessage() for r in caplog.records] == [
        "refused: no room, retry in 0s",
        "refused: queue full",
        "refused: no room, retry in 9s (and 4 more like it since)",
    ]
    assert {r.levelno for r in caplog.records} == {logging.INFO}


def test_a_log_line_writes_control_characters_a_client_sent_as_escapes(tmp_path, monkeypatch, restore_logging):
    """A client's X-Request-Id (its bytes 0x80-0xff read as latin-1: 0x9b is CSI to a
    terminal) or a path it asked for reaches a log line: the operator's terminal must not
    obey it, nor journald file the line as a blob; one line stays one line."""
    out, to_file = tmp_path / "stderr.txt", tmp_path / "daemon.log"
    stream = out.open("w")
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    setup_logging("info", str(to_file), stream=stream)
    bind_request_id("zz\x9b31mRED")
    logging.getLogger("appliance.test").error("unhandled error on GET %s", "/v1/\x1b]0;PWNED\x07\ttab")
    bind_request_id("")
    stream.close()
    for text in (out.read_text(), to_file.read_text().split(" ", 2)[2]):
        assert text == "ERROR appliance.test [req zz\\x9b31mRED]: unhandled error on GET /v1/\\x1b]0;PWNED\\x07\ttab\n"


@pytest.mark.parametrize(("keys", "said"), [
    ("", "; no API key required: anyone who reaches the port is served (keys.required = false)"),
    ("[keys]\nrequired = true\n", "; API keys required (keys.required = true)"),
], ids=["open", "guarded"])
def test_the_start_line_says_whether_a_key_is_required(daemons, keys, said):
    """The operator's first question of a new journal: is what is served open to anyone?"""
    daemon = daemons.start(fake_model("fake"), extra=keys)
    [line] = [x for x in daemon.log.read_text().splitlines() if "INFO appliance.api: serving " in x]
    assert line.startswith(f"INFO appliance.api: serving fake on http://127.0.0.1:{daemon.port}/v1 (config: ")
    assert line.endswith(said)
