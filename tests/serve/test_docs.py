"""/docs and /redoc work offline: every script, style sheet, icon and schema they load is served by the service."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest


class _Urls(HTMLParser):
    """Every URL an HTML page refers to: its src, href and spec-url attributes, and the quoted URLs and paths in
    its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href", "spec-url") and v]

    def handle_data(self, data):
        self.urls += re.findall(r"""["'`]((?:https?:)?//[^"'`\s]+|/[A-Za-z0-9_.\-/]+)["'`]""", data)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets_and_they_are_served(client, page):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    parser = _Urls()
    parser.feed(r.text)
    assert "/openapi.json" in parser.urls
    assert any(u.endswith(".js") for u in parser.urls)  # the UI's script is among them
    for url in parser.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"{page} loads {url} from another host"
        assert client.get(url).status_code == 200, url
    assert not re.search(r"https?://(?!localhost|127\.0\.0\.1)[^\s\"']*\.(js|css)", r.text)  # no CDN


def test_the_openapi_schema_documents_the_request_bodies_and_errors(client):
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/v1/recommend"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/RecommendRequest"
    components = schema["components"]["schemas"]
    assert components["RecommendRequest"]["properties"]["k"]["maximum"] == 1000
    assert "Event" in components and "RankRequest" in components
    assert {"200", "400", "413", "415", "422", "503"} <= set(post["responses"])
    assert schema["paths"]["/v1/rank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
