"""The content-addressed store and its read-only HTTP resource, over real HTTP."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from cockpit.store import Store, StoreError, content_disposition


class StoreWriting(TestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.store = Store(self.root, "https://cockpit.example.com/", reactor)

    @inlineCallbacks
    def test_file_is_stored_under_its_sha256_with_a_meta_sidecar(self):
        data = b"quarterly report\n"
        digest = hashlib.sha256(data).hexdigest()
        stored = yield self.store.put("attachments", data, "report.txt", "text/plain; charset=utf-8")
        self.assertEqual(stored.hash, digest)
        self.assertEqual(stored.path, self.root / "attachments" / digest[:2] / digest[2:4] / digest)
        self.assertEqual(stored.path.read_bytes(), data)
        self.assertEqual(stored.url,
                         f"https://cockpit.example.com/store/attachments/{digest[:2]}/{digest[2:4]}/{digest}")
        meta = json.loads(stored.path.with_name(digest + ".meta").read_text())
        self.assertEqual((meta["filename"], meta["content_type"], meta["size"]), ("report.txt", "text/plain", 17))
        self.assertIsInstance(meta["time"], float)
        self.assertEqual((stored.filename, stored.content_type, stored.size), ("report.txt", "text/plain", 17))

    def test_a_stored_file_is_dated_by_the_store_clock(self):
        clock = Clock()
        clock.advance(1_700_000_000.25)
        stored = Store(self.root, "https://cockpit.example.com/", clock).put_now("attachments", b"x", "x.txt",
                                                                                "text/plain")
        meta = json.loads(stored.path.with_name(stored.hash + ".meta").read_text())
        self.assertEqual(1_700_000_000.25, meta["time"])

    def test_every_new_name_is_synced_into_its_directory(self):
        from cockpit import files

        synced: list[Path] = []
        real_sync = files.sync_dir
        self.patch(files, "sync_dir", lambda path: (synced.append(Path(path)), real_sync(path)))
        data = b"first of its directory"
        digest = hashlib.sha256(data).hexdigest()
        self.root.mkdir()
        self.store.put_now("attachments", data, "a.txt", "text/plain")
        space = self.root / "attachments"
        leaf = space / digest[:2] / digest[2:4]
        # the three directories made, each in its parent; then the file and its .meta, in one go
        self.assertEqual([self.root, space, space / digest[:2], leaf], synced)
        synced.clear()
        self.store.put_now("attachments", data, "a.txt", "text/plain")  # stored already: nothing to write
        self.assertEqual([], synced)
        second = hashlib.sha256(data + b"!").hexdigest()
        self.store.put_now("attachments", data + b"!", "b.txt", "text/plain")
        self.assertNotIn(self.root, synced)  # the space was there: only what is new is synced
        self.assertEqual(space / second[:2] / second[2:4], synced[-1])

    @inlineCallbacks
    def test_identical_content_is_stored_once(self):
        first = yield self.store.put("attachments", b"same", "a.bin", "application/octet-stream")
        second = yield self.store.put("attachments", b"same", "b.bin", "application/octet-stream")
        self.assertEqual(first.path, second.path)
        files = sorted(p.name for p in first.path.parent.iterdir())
        self.assertEqual(files, [first.hash, first.hash + ".meta"])  # no temporary file left either
        self.assertEqual(second.filename, "a.bin")  # the sidecar describes the first store

    @inlineCallbacks
    def test_a_bad_content_type_is_kept_as_octet_stream(self):
        stored = yield self.store.put("attachments", b"x", "x", "text/html\r\nSet-Cookie: a=b")
        self.assertEqual(stored.content_type, "application/octet-stream")

    def test_a_space_name_with_a_path_in_it_is_refused(self):
        return self.assertFailure(self.store.put("../etc", b"x", "x", "text/plain"), StoreError)

    def test_content_disposition_is_attachment_with_a_quoted_ascii_name(self):
        self.assertEqual(content_disposition('ra"p;p\u00f6rt.pdf'),
                         "attachment; filename=\"ra_p_p_rt.pdf\"; filename*=UTF-8''ra%22p%3Bp%C3%B6rt.pdf")


class StoreOverHttp(TestCase):
    """The resource mounted at /store of a real site on a free port."""

    def setUp(self):
        self.root = Path(self.mktemp())
        self.store = Store(self.root, "http://127.0.0.1", reactor)
        top = Resource()
        top.putChild(b"store", self.store.resource())
        self.port = reactor.listenTCP(0, Site(top), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    @inlineCallbacks
    def get(self, path: str):
        response = yield treq.get(self.base + path, persistent=False)
        body = yield treq.content(response)
        return response, body

    @inlineCallbacks
    def test_a_full_path_returns_the_exact_bytes_with_type_and_safe_disposition(self):
        data = bytes(range(256)) * 40
        stored = yield self.store.put("attachments", data, "../../etc/chart.png", "image/png")
        response, body = yield self.get(stored.url[len("http://127.0.0.1"):])
        self.assertEqual(response.code, 200)
        self.assertEqual(body, data)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["image/png"])
        disposition = response.headers.getRawHeaders("content-disposition")[0]
        self.assertTrue(disposition.startswith("attachment; "), disposition)
        self.assertEqual(response.headers.getRawHeaders("x-content-type-options"), ["nosniff"])

    @inlineCallbacks
    def test_directories_partial_paths_traversal_and_meta_answer_404(self):
        stored = yield self.store.put("attachments", b"secret", "s.txt", "text/plain")
        h = stored.hash
        paths = [
            "/store/", "/store/attachments", "/store/attachments/", f"/store/attachments/{h[:2]}",
            f"/store/attachments/{h[:2]}/", f"/store/attachments/{h[:2]}/{h[2:4]}",
            f"/store/attachments/{h[:2]}/{h[2:4]}/", f"/store/attachments/{h[:2]}/{h[2:4]}/{h}.meta",
            f"/store/attachments/{h[:2]}/{h[2:4]}/{h}/", f"/store/attachments/{h[:2]}/{h[2:4]}/{h[:10]}",
            f"/store/attachments/{h[:2]}/{h[2:4]}/../{h[2:4]}/{h}",
            f"/store/attachments/{h[:2]}/%2e%2e/{h[2:4]}/{h}", f"/store/attachments/{h[:2]}%2f{h[2:4]}/{h}",
            f"/store/attachments/%252e%252e/{h[2:4]}/{h}", f"/store/..%2f..%2fetc/{h[:2]}/{h[2:4]}/{h}",
            f"/store/Attachments/{h[:2]}/{h[2:4]}/{h}", f"/store/attachments/00/00/{h}",
            f"/store/attachments/{h[:2]}/{h[2:4]}/{h.upper()}",
        ]
        for path in paths:
            response, body = yield self.get(path)
            self.assertEqual(response.code, 404, path)
            self.assertNotIn(b"secret", body, path)
            self.assertNotIn(h.encode(), body, path)

    @inlineCallbacks
    def test_an_unknown_hash_answers_404(self):
        h = "ab" * 32
        response, _ = yield self.get(f"/store/attachments/ab/ab/{h}")
        self.assertEqual(response.code, 404)

    @inlineCallbacks
    def test_links_planted_in_the_tree_are_not_followed(self):
        secret = Path(self.mktemp()).absolute()  # a link's relative target is read from the link's directory
        secret.mkdir()
        (secret / "config.toml").write_bytes(b'[api]\ntokens = ["s3cret-token"]\n')
        stored = yield self.store.put("attachments", b"public", "p.txt", "text/plain")
        h = stored.hash
        leaf = stored.path.parent
        url = f"/store/attachments/{h[:2]}/{h[2:4]}/{h}"
        response, body = yield self.get(url)
        self.assertEqual((200, b"public"), (response.code, body))

        # the file itself a link to the config, its sidecar left in place
        stored.path.unlink()
        stored.path.symlink_to(secret / "config.toml")
        yield self.assert_not_served(url)
        stored.path.unlink()
        stored.path.write_bytes(b"public")

        # the sidecar a link (to a JSON file that would do as one)
        meta = leaf / (h + ".meta")
        (secret / "meta.json").write_bytes(meta.read_bytes())
        meta.unlink()
        meta.symlink_to(secret / "meta.json")
        yield self.assert_not_served(url)
        meta.unlink()
        meta.write_bytes((secret / "meta.json").read_bytes())

        # a directory on the way a link to a tree that holds the same names
        outside = secret / "bb"
        outside.mkdir()
        (outside / h).write_bytes(b"s3cret-token")
        (outside / (h + ".meta")).write_bytes(meta.read_bytes())
        leaf.rename(leaf.with_name("moved"))
        leaf.symlink_to(outside)
        yield self.assert_not_served(url)
        leaf.unlink()
        space = self.root / "attachments"
        space.rename(self.root / "elsewhere")
        space.symlink_to((self.root / "elsewhere").absolute())
        yield self.assert_not_served(url)

    @inlineCallbacks
    def test_only_regular_files_are_served(self):
        import os

        stored = yield self.store.put("attachments", b"x", "x.txt", "text/plain")
        url = f"/store/attachments/{stored.hash[:2]}/{stored.hash[2:4]}/{stored.hash}"
        stored.path.unlink()
        os.mkfifo(stored.path)  # an open for reading would wait for a writer for ever
        yield self.assert_not_served(url)
        stored.path.unlink()
        stored.path.mkdir()
        yield self.assert_not_served(url)

    @inlineCallbacks
    def assert_not_served(self, url: str):
        response, body = yield self.get(url)
        self.assertEqual(404, response.code, url)
        self.assertEqual({"error": "no such file"}, json.loads(body))
