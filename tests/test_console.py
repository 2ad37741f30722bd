"""The one console format of metalm's programs (metalm.console): `PROG: level[ (rank N)]: message` on the stderr
of the moment, whichever module logged the line."""
import logging
import re
import time

from metalm.console import ConsoleFormatter, console_handler, warn


def _record(msg="disk %s is full", args=("/tmp",), level=logging.WARNING):
    return logging.LogRecord("metalm.train", level, __file__, 1, msg, args, None)


def test_the_format_with_and_without_rank_and_timestamps():
    assert ConsoleFormatter().format(_record()) == "metalm: warning: disk /tmp is full"
    assert ConsoleFormatter("metalm", rank=1).format(_record()) == "metalm: warning (rank 1): disk /tmp is full"
    line = ConsoleFormatter("metalm-evaluate", timestamps=True).format(_record(level=logging.INFO))
    stamp = time.strftime("%Y-%m-%d ", time.localtime())
    assert line.startswith(stamp)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d metalm-evaluate: info: disk /tmp is full", line), line


def test_warn_from_any_module_reaches_the_entry_points_handler(capsys):
    logger = logging.getLogger("metalm")
    handler, level = console_handler("metalm", rank=0), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        warn("W&B could not start; logging locally")  # the helper modules call
        logging.getLogger("metalm.checkpoint").warning("ignoring incomplete checkpoint %s", "step_2")  # a logger
        logging.getLogger("metalm.data").info("below the level: not shown")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert capsys.readouterr().err.splitlines() == [
        "metalm: warning (rank 0): W&B could not start; logging locally",
        "metalm: warning (rank 0): ignoring incomplete checkpoint step_2"]
