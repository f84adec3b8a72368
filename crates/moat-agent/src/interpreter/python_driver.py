# moat's code-interpreter driver for Python.
#
# The agent starts it as
#   python3 -u -c "import sys; exec(compile(sys.argv.pop(1), '<moat-driver>', 'exec'))" \
#       <this text> <command fd> <event fd> <entry limit>
# so that its frames carry a file name of their own, which tracebacks leave out. It
# reads one JSON command per line from the command pipe ({"code": str, "env": {str: str}}), runs
# the code in a persistent namespace, and writes JSON frames, one per line, to the event pipe:
# {"type": "ready"} once at start, then per command any number of "result" frames, at most one
# "error" frame and always one "done" frame. The code's own stdout and stderr are the process's
# (pipes the agent reads separately), so nothing the code prints can look like a frame.
import sys

# The working directory stays importable for user code (as in Jupyter), but must not shadow the
# modules this driver imports (a user's `json.py`, say).
_cwd_entry = sys.path.pop(0) if sys.path and sys.path[0] in ("", ".") else None

import ast
import base64
import builtins
import io
import json
import linecache
import os
import signal
import time
import traceback
import types
import _thread

_DRIVER_FILE = sys._getframe().f_code.co_filename
# Seconds a partial line of output may wait before it is sent.
FLUSH_EVERY = 0.05
_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect

# MIME type -> result key on the wire; anything else goes into "extra".
_KEYS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/chart": "chart",
    "e2b/data": "data",
}
_BINARY = {"image/png", "image/jpeg", "application/pdf"}
_STRUCTURED = {"application/json", "e2b/chart", "e2b/data"}


def _plain(value):
    """A number or text as JSON has it (numpy scalars and dates made plain)."""
    try:
        if hasattr(value, "item"):
            value = value.item()
    except Exception:
        pass
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return str(value)


def _axis(ax, which):
    """The label, scale, ticks and tick labels of an axes' x or y axis, as E2B's charts."""
    get = getattr(ax, "get_%slabel" % which)
    axis = getattr(ax, "%saxis" % which)
    ticks = [_plain(t) for t in getattr(ax, "get_%sticks" % which)()]
    labels = [t.get_text() for t in getattr(ax, "get_%sticklabels" % which)()]
    return {
        "%s_label" % which: get() or None,
        "%s_unit" % which: None,
        "%s_scale" % which: axis.get_scale(),
        "%s_ticks" % which: ticks,
        "%s_tick_labels" % which: labels,
    }


def _axes_chart(ax):
    """The data of one matplotlib axes as an E2B chart (line, scatter, bar or pie), or None."""
    from matplotlib.collections import PathCollection
    from matplotlib.patches import Rectangle, Wedge

    title = ax.get_title() or None
    wedges = [p for p in ax.patches if isinstance(p, Wedge)]
    if wedges:
        texts = [t.get_text() for t in ax.texts]
        return {
            "type": "pie",
            "title": title,
            "elements": [
                {"label": texts[i] if i < len(texts) else w.get_label(),
                 "angle": _plain(w.theta2 - w.theta1), "radius": _plain(w.r)}
                for i, w in enumerate(wedges)
            ],
        }
    base = {"title": title}
    base.update(_axis(ax, "x"))
    base.update(_axis(ax, "y"))
    if ax.containers:
        elements = []
        ticks = {round(float(t), 6): l for t, l in zip(base["x_ticks"], base["x_tick_labels"])
                 if isinstance(t, (int, float))}
        for container in ax.containers:
            group = container.get_label()
            for bar in getattr(container, "patches", []):
                if not isinstance(bar, Rectangle):
                    continue
                center = round(float(bar.get_x() + bar.get_width() / 2), 6)
                elements.append({"label": ticks.get(center, str(center)),
                                 "value": _plain(bar.get_height()), "group": group})
        if elements:
            base.update({"type": "bar", "elements": elements})
            return base
    lines = [l for l in ax.get_lines() if len(l.get_xydata())]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    if lines and not scatters:
        base.update({"type": "line", "elements": [
            {"label": l.get_label(), "points": [[_plain(x), _plain(y)] for x, y in l.get_xydata()]}
            for l in lines]})
        return base
    if scatters:
        base.update({"type": "scatter", "elements": [
            {"label": c.get_label(), "points": [[_plain(x), _plain(y)] for x, y in c.get_offsets()]}
            for c in scatters]})
        return base
    return None


def figure_chart(fig):
    """The data of a matplotlib figure as E2B extracts it: one chart, or a superchart of its
    axes' charts; None when nothing in it is a chart moat reads (or reading it fails)."""
    try:
        charts = [c for c in (_axes_chart(ax) for ax in fig.get_axes()) if c is not None]
        if not charts:
            return None
        if len(charts) == 1:
            return charts[0]
        title = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) else None
        return {"type": "superchart", "title": title, "elements": charts}
    except Exception:
        return None
_REPR_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_pdf_", "application/pdf"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
    ("_repr_javascript_", "application/javascript"),
)


def _main():
    cmd_fd, event_fd, entry_limit = (int(a) for a in sys.argv[1:4])
    # Child processes of the code must not inherit the private pipes.
    os.set_inheritable(cmd_fd, False)
    os.set_inheritable(event_fd, False)
    if _cwd_entry is not None:
        sys.path.insert(0, _cwd_entry)
    sys.argv = [""]
    # Figures render off-screen; they are sent as PNG results at the end of each execution.
    os.environ.setdefault("MPLBACKEND", "Agg")

    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    ns = main.__dict__

    # Bound now, so that code rebinding these names cannot break the driver.
    write, dumps, loads, b64 = os.write, json.dumps, json.loads, base64.b64encode
    send_lock = _thread.allocate_lock()
    state = {"running": False, "count": 0, "loop": None}

    def flush_std():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass

    def send(frame):
        # Output written before a frame must reach its pipe first: the agent reads the output
        # pipes dry whenever a frame arrives.
        flush_std()
        data = (dumps(frame, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        with send_lock:
            view = memoryview(data)
            while view:
                view = view[write(event_fd, view):]

    def on_sigint(signum, frame):
        # The agent interrupts an execution with SIGINT; one arriving between executions is
        # ignored rather than killing the driver.
        if state["running"]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)

    def fits(value):
        if isinstance(value, str):
            return len(value) <= entry_limit and len(value.encode("utf-8", "replace")) <= entry_limit
        try:
            return len(dumps(value)) <= entry_limit
        except Exception:
            return False

    def result_frame(data, main_result):
        frame = {"type": "result", "is_main_result": main_result}
        extra = {}
        for mime, value in data.items():
            if not isinstance(mime, str):
                continue
            if mime in _BINARY and isinstance(value, (bytes, bytearray)):
                value = b64(bytes(value)).decode("ascii")
            elif mime in _BINARY and isinstance(value, str):
                value = value.strip()
            if mime not in _STRUCTURED and not isinstance(value, str):
                continue
            if not fits(value):
                if mime != "text/plain":
                    continue
                value = value[: entry_limit // 4] + "\u2026 [truncated]"
            key = _KEYS.get(mime)
            if key is None:
                extra[mime] = value
            else:
                frame[key] = value
        if extra:
            frame["extra"] = extra
        return frame

    def bundle(obj):
        data = {}
        # Classes have the methods unbound; only instances render richly (as in IPython).
        if not isinstance(obj, type):
            try:
                method = getattr(obj, "_repr_mimebundle_", None)
                got = method(include=None, exclude=None) if callable(method) else None
                if isinstance(got, tuple) and got:
                    got = got[0]
                if isinstance(got, dict):
                    data.update(got)
            except Exception:
                pass
            for name, mime in _REPR_METHODS:
                if mime in data:
                    continue
                try:
                    method = getattr(obj, name, None)
                    got = method() if callable(method) else None
                except Exception:
                    continue
                if isinstance(got, tuple) and got:
                    got = got[0]
                if got is not None:
                    data[mime] = got
        if not isinstance(data.get("text/plain"), str):
            try:
                data["text/plain"] = repr(obj)
            except Exception as e:
                data["text/plain"] = "<%s object (repr failed: %s)>" % (type(obj).__name__, e)
        return data

    def display(*objs, **_kwargs):
        """Shows each object as a result of the current execution (like IPython's display)."""
        for obj in objs:
            send(result_frame(bundle(obj), False))

    ns["display"] = display

    def flush_figures():
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        try:
            for num in plt.get_fignums():
                fig = plt.figure(num)
                buf = io.BytesIO()
                fig.savefig(buf, format="png", bbox_inches="tight")
                data = {"text/plain": repr(fig), "image/png": buf.getvalue()}
                chart = figure_chart(fig)
                if chart is not None:
                    data["e2b/chart"] = chart
                send(result_frame(data, False))
            plt.close("all")
        except Exception as e:
            print("moat: rendering matplotlib figures failed: %r" % (e,), file=sys.stderr)

    def run(code_obj):
        state["running"] = True
        try:
            value = eval(code_obj, ns)
            if code_obj.co_flags & _CO_COROUTINE:
                if state["loop"] is None:
                    import asyncio

                    state["loop"] = asyncio.new_event_loop()
                value = state["loop"].run_until_complete(value)
            return value
        finally:
            state["running"] = False

    def execute(code):
        state["count"] += 1
        filename = "<cell %d>" % state["count"]
        # Tracebacks show the source lines of earlier cells too.
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        tree = ast.parse(code, filename, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        run(compile(tree, filename, "exec", flags=flags, dont_inherit=True))
        if last is not None:
            value = run(compile(last, filename, "eval", flags=flags, dont_inherit=True))
            # A trailing `;` hides the value, as in IPython.
            if value is not None and not code.rstrip().endswith(";"):
                ns["_"] = value
                send(result_frame(bundle(value), True))

    def strip_driver(te, seen):
        # Tracebacks show the code's frames only, not the driver's around them.
        if te is None or id(te) in seen:
            return
        seen.add(id(te))
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if f.filename != _DRIVER_FILE]
        )
        strip_driver(te.__cause__, seen)
        strip_driver(te.__context__, seen)

    def error_frame(e):
        try:
            value = str(e)
        except Exception:
            value = "<exception str() failed>"
        try:
            if isinstance(e, SyntaxError) and str(e.filename).startswith("<cell "):
                # The cell did not compile: no frame of it ran.
                text = "".join(traceback.format_exception_only(type(e), e))
            else:
                te = traceback.TracebackException(type(e), e, e.__traceback__)
                strip_driver(te, set())
                text = "".join(te.format())
        except Exception:
            text = "%s: %s\n" % (type(e).__name__, value)
        return {"type": "error", "name": type(e).__name__, "value": value, "traceback": text}

    def handle(command):
        env = command.get("env") or {}
        saved = {k: os.environ.get(k) for k in env}
        try:
            os.environ.update(env)
            execute(command.get("code") or "")
        except BaseException as e:
            state["running"] = False
            send(error_frame(e))
        finally:
            for k, old in saved.items():
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old
            flush_figures()
            send({"type": "done"})

    # Whole lines, as Jupyter sends them: `print` writes its text and its newline separately,
    # which unbuffered streams would pass on as two pieces. A partial line goes out within
    # FLUSH_EVERY seconds, and everything before any frame (see `send`).
    for fd, name in ((1, "stdout"), (2, "stderr")):
        raw = io.FileIO(fd, "w", closefd=False)
        stream = io.TextIOWrapper(
            io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace", line_buffering=True
        )
        setattr(sys, name, stream)
        setattr(sys, "__" + name + "__", stream)

    def flush_periodically():
        while True:
            time.sleep(FLUSH_EVERY)
            flush_std()

    _thread.start_new_thread(flush_periodically, ())

    pending = []
    send({"type": "ready"})
    while True:
        try:
            chunk = os.read(cmd_fd, 65536)
        except KeyboardInterrupt:
            continue
        if not chunk:
            return
        while True:
            head, sep, rest = chunk.partition(b"\n")
            pending.append(head)
            if not sep:
                break
            line = b"".join(pending)
            pending = []
            chunk = rest
            try:
                command = loads(line)
            except ValueError:
                continue
            try:
                handle(command)
            except KeyboardInterrupt:
                # Late interrupt while reporting: the frames are written; carry on.
                pass


_main()
