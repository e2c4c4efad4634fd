"""The server's log: uvicorn's own lines (its access log has one line per answered request) and gpt2onnx's (one
line per request refused before it was read, abandoned while it was sent, cancelled or cut short), as text or
as one JSON object per line for log shippers (`--log-format json`).

A JSON line has "time" (UTC, ISO 8601), "level", "logger" and "message"; an access line adds "client",
"method", "path", "http_version" and "status"; gpt2onnx's request lines add "event" (abandoned, cancelled,
refused, failed, header_timeout...) and what they know ("id", "client", "tokens", "seconds"...). An exception
is one line too, its traceback in "exception".
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import sys

# the attributes every LogRecord has: anything else on a record was passed as `extra` and goes into the JSON
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")  # uvicorn.access's arguments, in order


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                     timespec="milliseconds").replace("+00:00", "Z"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            entry.update(zip(_ACCESS_FIELDS, record.args))
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_config(level: str, form: str) -> dict:
    """uvicorn's `log_config` for this level and format ("text": uvicorn's own lines; "json"): uvicorn's loggers
    and gpt2onnx's, errors to stderr and the access log to stdout as uvicorn does."""
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["gpt2onnx"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    if form == "json":
        config["formatters"] = {"json": {"()": f"{__name__}.JsonFormatter"}}
        for handler in config["handlers"].values():
            handler["formatter"] = "json"
    return config


def announce(message: str, form: str) -> None:
    """A line from the CLI before the server's logging is set up, in the log's format, on stderr."""
    if form == "json":
        record = logging.LogRecord("gpt2onnx", logging.INFO, __file__, 0, message, (), None)
        message = JsonFormatter().format(record)
    print(message, file=sys.stderr, flush=True)
