"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, against a real cockpit on Redis.

Each test spawns ``twistd -n cockpit`` (tests/cockpits.py) and opens ``/`` in headless Chromium
(tests/browser.py). Waits are the browser's own ``wait_for_selector``, bounded by the times the
issue sets; nothing here sleeps. (A string given to ``wait_for_function`` would be evaluated in
the page, which its Content-Security-Policy rightly refuses: selectors such as ``:text-is()`` do it.)
"""
from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.browser import Browser, missing
from tests.cockpits import call, eventually, spawn_cockpit
from tests.redis_server import RedisServer, shared_server

TOKEN = "dash-s3cret"
ACTIONS = "def hello(service, event):\n    service.log('hello from', service.key)\n    return 'fine'\n"


def base_of(cockpit: Any) -> str:
    return cockpit.api.removesuffix("/api")


class DashboardCase(TestCase):
    timeout = 90
    api_lines = ""
    size = (1280, 800)

    def redis(self) -> Any:
        redis = shared_server()
        redis.flush()
        return redis

    @inlineCallbacks
    def setUp(self):
        why = missing()
        if why:
            self.fail(f"browser tests need Chromium and Playwright: {why}")
        self.redis_server = self.redis()
        self.cockpit = yield spawn_cockpit(self, extra=f'[redis]\nurl = "{self.redis_server.url}"\n',
                                           api=self.api_lines).started()
        self.base = base_of(self.cockpit)
        self.browser = Browser(*self.size)
        yield self.browser.start()
        self.addCleanup(self.browser.stop)

    def page(self, fn, *args):
        return self.browser.call(fn, *args)

    def open(self) -> Any:
        """The dashboard, loaded and live."""
        def go(page):
            page.goto(self.base + "/")
            page.wait_for_selector("#connection.ok", timeout=10000)
            return page.text_content("#connection")
        return self.page(go)


class LiveTests(DashboardCase):
    @inlineCallbacks
    def test_an_alarm_posted_over_rest_appears_in_the_live_view_within_a_second(self):
        self.assertEqual("live", (yield self.open()).strip())
        code, reply = yield call("POST", f"{self.cockpit.api}/events/alarm",
                                 {"service": "node!web1", "method": "disk", "msg": "disk full"})
        self.assertEqual(202, code)
        guid = reply["guid"]
        text = yield self.page(lambda page: page.wait_for_selector(
            f'#events [data-guid="{guid}"]', timeout=1000).text_content())
        self.assertIn("node!web1", text)

        def show_json(page):
            page.click(f'#events [data-guid="{guid}"]')
            return page.wait_for_selector("pre#event-json", state="visible", timeout=2000).text_content()

        shown = json.loads((yield self.page(show_json)))
        self.assertEqual((guid, "alarm", "disk full"), (shown["guid"], shown["type"], shown["msg"]))

    @inlineCallbacks
    def test_no_request_leaves_the_cockpit_and_the_policy_forbids_inline_script(self):
        yield self.open()
        yield self.page(lambda page: page.wait_for_load_state("networkidle", timeout=10000))
        outside = [url for url in self.browser.requests if not url.startswith(self.base + "/")]
        self.assertEqual([], outside)
        self.assertEqual([], [m for m in self.browser.console if "Content Security Policy" in m])
        import treq

        response = yield treq.get(self.base + "/", persistent=False)
        yield response.content()
        policy = response.headers.getRawHeaders("content-security-policy")[0]
        self.assertIn("script-src 'self'", policy)
        self.assertNotIn("unsafe-inline", policy.split("script-src", 1)[1].split(";")[0])
        self.assertEqual(["nosniff"], response.headers.getRawHeaders("x-content-type-options"))


class ActionTests(DashboardCase):
    @inlineCallbacks
    def test_an_actions_button_starts_a_run_whose_state_goes_to_ok_and_whose_log_can_be_read(self):
        api = self.cockpit.api
        for method, path, body in (
                ("POST", "/repos", {"name": "demo"}),
                ("PUT", "/repos/demo/templates/node", {"files": {"actions.py": ACTIONS}}),
                ("POST", "/repos/demo/blueprints", {"name": "main.yaml", "content": "node__web1: {}\n"}),
                ("POST", "/repos/demo/blueprints/main.yaml/execute", None)):
            code, reply = yield call(method, api + path, body)
            self.assertLess(code, 300, (path, reply))
        yield self.open()
        row = '#services [data-service="demo/node!web1"]'

        def run_it(page):
            page.click(f'{row} button[data-action="hello"]', timeout=10000)
            page.wait_for_selector(f'{row} [data-state-of="hello"]:text-is("ok")', timeout=15000)

        yield self.page(run_it)
        code, runs = yield call("GET", f"{api}/runs?action=hello")
        [run] = runs["runs"]
        self.assertEqual(("ok", "rest"), (run["state"], run["trigger"]["kind"]))

        def read_log(page):
            page.click(f'#runs [data-run="{run["id"]}"]', timeout=10000)
            page.wait_for_selector('pre#run-log:has-text("hello from")', timeout=5000)
            return page.text_content("pre#run-log")

        self.assertIn("hello from node!web1", (yield self.page(read_log)))


class GroupTests(DashboardCase):
    @inlineCallbacks
    def test_ack_and_close_of_an_eco_from_the_page_show_in_the_api(self):
        api = self.cockpit.api
        code, _ = yield call("POST", f"{api}/events/eco", {"app_name": "shop", "error_msg": "order 7 lost",
                                                           "func_name": "pay", "line_nbr": 3})
        self.assertEqual(202, code)

        @inlineCallbacks
        def counted():
            _, page = yield call("GET", f"{api}/ecos")
            return page["ecos"] or None

        [eco] = yield eventually(counted, timeout=20, what="the eco counted")
        yield self.open()
        row = f'#ecos [data-group="{eco["id"]}"]'
        yield self.page(lambda page: page.click(f'{row} button[data-do="ack"]', timeout=10000))

        @inlineCallbacks
        def field(name):
            _, group = yield call("GET", f"{api}/ecos/{eco['id']}")
            return group if group.get(name) else None

        acked = yield eventually(lambda: field("acked"), timeout=10, what="the ack")
        self.assertTrue(acked["acked"]["by"])
        yield self.page(lambda page: page.click(f'{row} button[data-do="close"]', timeout=10000))

        @inlineCallbacks
        def closed():
            _, group = yield call("GET", f"{api}/ecos/{eco['id']}")
            return group if group["state"] == "CLOSED" else None

        yield eventually(closed, timeout=10, what="the close")
        yield self.page(lambda page: page.wait_for_selector(f'{row} [data-field="state"]:text-is("CLOSED")',
                                                            timeout=5000))


class RedisRestartTests(DashboardCase):
    def redis(self) -> Any:
        server = RedisServer().start()
        self.addCleanup(server.cleanup)
        return server

    @inlineCallbacks
    def test_the_page_shows_it_was_disconnected_and_resumes_on_its_own(self):
        yield self.open()
        self.redis_server.kill()
        yield self.page(lambda page: page.wait_for_selector("#connection.bad", timeout=20000))
        self.assertEqual("disconnected", (yield self.page(lambda page: page.text_content("#connection"))).strip())
        self.redis_server.start()
        yield self.page(lambda page: page.wait_for_selector("#connection.ok", timeout=30000))

        @inlineCallbacks
        def accepted():
            code, reply = yield call("POST", f"{self.cockpit.api}/events/alarm", {"service": "node!back"})
            return reply["guid"] if code == 202 else None

        guid = yield eventually(accepted, timeout=20, what="the bus taking events again")
        yield self.page(lambda page: page.wait_for_selector(f'#events [data-guid="{guid}"]', timeout=5000))


class TokenTests(DashboardCase):
    api_lines = f'tokens = ["{TOKEN}"]'

    @inlineCallbacks
    def test_the_page_asks_for_a_token_says_when_it_is_wrong_and_opens_with_the_right_one(self):
        def login(page, token):
            page.fill("input#token", token)
            page.click("button#login-submit")

        def first_visit(page):
            page.goto(self.base + "/")
            page.wait_for_selector("form#login", state="visible", timeout=10000)

        yield self.page(first_visit)
        yield self.page(login, "wrong")
        def refusal(page):
            page.wait_for_selector("#login-error:not(:empty)", timeout=5000)
            return page.text_content("#login-error")

        message = yield self.page(refusal)
        self.assertIn("not one of", message)
        yield self.page(login, TOKEN)

        def opened(page):
            page.wait_for_selector("form#login", state="hidden", timeout=5000)
            page.wait_for_selector("main#dashboard", state="visible", timeout=5000)
            page.wait_for_selector("#connection.ok", timeout=10000)
            page.reload()  # kept: no second question
            page.wait_for_selector("#connection.ok", timeout=10000)
            return page.is_visible("form#login")

        self.assertFalse((yield self.page(opened)))
        self.assertEqual([], [url for url in self.browser.requests if TOKEN in url])  # never in a URL


class LayoutTests(DashboardCase):
    """Legible at 1280×800 and 390×844: no sideways scroll on the phone, no two sections overlapping."""

    @inlineCallbacks
    def check(self, width: int, height: int) -> Any:
        for n in range(3):
            yield call("POST", f"{self.cockpit.api}/events/alarm",
                       {"service": f"node!web{n}", "method": "disk", "msg": f"disk {90 + n}% full on /var"})
        yield call("POST", f"{self.cockpit.api}/events/eco", {"app_name": "shop", "error_msg": "KeyError: 'sku'"})
        yield self.open()

        def measure(page):
            page.set_viewport_size({"width": width, "height": height})
            return page.evaluate("""() => {
                const boxes = [...document.querySelectorAll('main#dashboard > section')]
                    .filter(s => s.offsetParent !== null).map(s => s.getBoundingClientRect());
                const overlaps = [];
                for (let i = 0; i < boxes.length; i++)
                    for (let j = i + 1; j < boxes.length; j++) {
                        const a = boxes[i], b = boxes[j];
                        if (a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1)
                            overlaps.push([i, j]);
                    }
                return {scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
                        sections: boxes.length, overlaps,
                        font: parseFloat(getComputedStyle(document.body).fontSize)};
            }""")

        found = yield self.page(measure)
        shot = self.mktemp() + ".png"
        yield self.page(lambda page: page.screenshot(path=shot, full_page=True))
        return found

    @inlineCallbacks
    def test_desktop(self):
        found = yield self.check(1280, 800)
        self.assertGreaterEqual(found["sections"], 5)
        self.assertEqual([], found["overlaps"])
        self.assertLessEqual(found["scroll"], found["inner"])
        self.assertGreaterEqual(found["font"], 12)

    @inlineCallbacks
    def test_phone(self):
        found = yield self.check(390, 844)
        self.assertEqual([], found["overlaps"])
        self.assertLessEqual(found["scroll"], found["inner"], "the page scrolls sideways on a phone")
        self.assertGreaterEqual(found["font"], 12)

