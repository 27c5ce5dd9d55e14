"""A worker's traceback as the user should read it: their code, once, without Ray's frames.

Ray hands the driver the remote traceback as text: a ``ray::WorkerActor.run()``
header, the caret lines of its own frames, neve's frames that call the user's
function, then the user's frames, all coloured with terminal codes even when
the output goes to a file. :func:`user_traceback` keeps the user's part.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CARETS = re.compile(r"^\s*[\^~]+\s*$")
_FRAME = re.compile(r'^\s*File "(?P<path>[^"]*)", line \d+')
#: neve's own modules, on the driver's machine or any other (an installed or a source tree)
_NEVE_PATH = re.compile(r"[/\\]neve[/\\][^\"]*\.py$")


def plain(text: str) -> str:
    """The text without terminal colour codes."""
    return _ANSI.sub("", text)


def _is_neve(path: str) -> bool:
    return bool(_NEVE_PATH.search(path))


def user_traceback(text: str) -> str:
    """The remote traceback without Ray's header and carets, nor neve's calling frames.

    Frames of neve that run before the user's first frame (the actor, the run
    entry, the framework backend) are dropped; everything from the user's first
    frame on is kept, neve frames the user's code called included. When every
    frame is neve's (an error in neve itself), they are all kept.
    """
    lines = [line for line in plain(text).strip().splitlines() if not _CARETS.match(line)]
    if lines and lines[0].startswith("ray::"):
        lines = lines[1:]
    frames = [m.group("path") for m in map(_FRAME.match, lines) if m]
    if not any(not _is_neve(path) for path in frames):
        return "\n".join(lines)
    out: list[str] = []
    skipping = False  # inside a leading neve frame (its source lines follow it)
    leading = True  # no frame of the user's seen yet in this traceback section
    for line in lines:
        frame = _FRAME.match(line)
        if frame:
            if leading and _is_neve(frame.group("path")):
                skipping = True
                continue
            leading = skipping = False
        elif skipping and line.startswith("    "):
            continue
        else:
            skipping = False
            if line.startswith("Traceback (most recent call last)"):
                leading = True  # a chained exception's traceback starts over
        out.append(line)
    return "\n".join(out)


def death_cause(error: BaseException) -> str:
    """What happened to a worker process, from what Ray reports of its death: lost with
    its node, killed by Ray's memory monitor, or died (a signal, the OOM killer, a crash)."""
    text = " ".join(plain(str(getattr(error, "error_msg", None) or error)).split())
    lowered = text.lower()
    detail = ""
    for marker in ("worker exit detail:", "the actor's node was", "node id:"):
        at = lowered.find(marker)
        if at >= 0:
            # Ray's own list of likely causes follows the detail; neve gives its own.
            detail = re.split(r"\. | Some common causes| The actor never ran",
                              text[at:])[0].strip().rstrip(".")
            break
    said = f" (Ray: {detail})" if detail else ""
    if "node has died" in lowered or "node died" in lowered or "node was terminated" in lowered:
        return f"was lost with its node{said}"
    if "memory monitor" in lowered or "low on memory" in lowered:
        return f"was killed by Ray's memory monitor: its node ran low on memory{said}"
    return (f"died{said}; likely causes: killed by a signal (SIGKILL) or the kernel's "
            "out-of-memory killer, or a crash in native code (LightGBM aborts a worker "
            "whose peer is gone)")
