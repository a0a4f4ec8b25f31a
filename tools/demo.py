"""`tether demo`: the whole story on this machine, printing each step.

Provision a local sandbox; write a small web app and its test; edit it; grep it; run its tests; start
its server as a background job; open a tunnel to it and fetch a page through it; tear down.
"""

from __future__ import annotations

import sys
import textwrap
import time

import httpx

from providers import Fleet, Request
from tunnels import TunnelManager

APP = textwrap.dedent('''\
    """A tiny web app: GET /NAME answers a greeting."""
    import http.server


    def greeting(name):
        return f"Hello, {name}!"


    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = greeting(self.path.strip("/") or "world").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass


    if __name__ == "__main__":
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        print(f"listening on {server.server_port}", flush=True)
        server.serve_forever()
''')

TEST = textwrap.dedent("""\
    import unittest

    from app import greeting


    class GreetingTest(unittest.TestCase):
        def test_greets_by_name(self):
            self.assertEqual(greeting("tether"), "Hi, tether!")


    if __name__ == "__main__":
        unittest.main()
""")


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(text: str) -> None:
    for line in text.rstrip("\n").splitlines():
        print(f"    {line}")


async def run_demo() -> int:
    fleet = Fleet(config={})  # the embedded local provider, whatever the config says
    started = time.monotonic()
    try:
        step("provisioning a local sandbox (embedded SSH server on 127.0.0.1, no sshd, no cloud account)")
        box = await fleet.create(Request(provider="local", name=f"demo-{int(time.time())}"))
        show(f"{box.name} ({box.id}) at {box.endpoint.display}, working in {await box.cwd()}")

        step("writing a small web app and its test")
        for path, text in (("app.py", APP), ("test_app.py", TEST)):
            written = await box.write(path, text)
            show(f"{written.path}: {written.bytes} bytes")

        step("editing the greeting")
        edited = await box.edit("app.py", 'f"Hello, {name}!"', 'f"Hi, {name}!"')
        show(edited.diff)

        step("grepping for the greeting")
        show((await box.grep("Hi, ", output_mode="content")).text)

        step("running the tests")
        tests = await box.run("python3 -m unittest -v test_app 2>&1")
        show(tests.stdout)
        if tests.exit_code != 0:
            raise RuntimeError("the demo app's tests failed")

        step("starting the server as a background job")
        job = await box.start_job("python3 app.py")
        output = ""
        while "listening on" not in output:
            out = await box.job_output(job.id, wait_ms=5000)
            output += out.stdout
            if out.status == "exited":
                raise RuntimeError(f"the server exited: {out.stderr}")
        port = int(output.split("listening on")[1].split()[0])
        show(f"job {job.id} listening on port {port} inside the sandbox")

        step("fetching a page through a tunnel")
        tunnels = TunnelManager()
        tunnel = await tunnels.open(box, port, backend="local")
        show(f"tunnel {tunnel.id}: {tunnel.url}")
        async with httpx.AsyncClient() as client:
            page = await client.get(f"{tunnel.url}/tether")
        show(f"GET {tunnel.url}/tether -> {page.status_code} {page.text!r}")
        await tunnels.close_all()

        step("tearing down")
        await box.job_kill(job.id)
        event = await box.destroy()
        usd = event.estimated_usd or 0
        show(f"terminated after {event.seconds:.1f}s; billing {event.billing_model}, cost ${usd:.2f}")
        print(f"\ndone in {time.monotonic() - started:.1f}s", flush=True)
        return 0
    except BrokenPipeError:  # (`tether demo | head`: quietly, as any command whose reader left)
        raise
    except Exception as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        await fleet.close(teardown_created=True)
