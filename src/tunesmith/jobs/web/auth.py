"""The dashboard's login when the server has an API key: the key is typed once into a form, and
the browser then holds a session cookie instead of the key.

    session cookie  "<issued>.<nonce>.<HMAC(key, session|issued|nonce)>": HttpOnly, SameSite=Strict,
                    so page scripts cannot read it and other sites' requests do not carry it. It
                    never holds the key, and stops working after SESSION_TTL_S or when the server's
                    key changes.
    CSRF token      HMAC(key, csrf|nonce) of the session's nonce, in a cookie the page's script
                    reads and echoes in the X-CSRF-Token header of every request that changes
                    something. A request from another site can carry neither (SameSite), and a
                    page that is not ours cannot read the cookie to forge the header.

The Guard (serve/checks.py) lets a request in with a valid bearer key or, with no Authorization
header at all, when session_check says so. With no API key the Guard checks nothing; the /ui
routes that change something then still ask for the X-CSRF-Token header (any value): a header a
cross-site form cannot send, and one a cross-site script cannot add without a CORS preflight this
server never answers.
"""
from __future__ import annotations

import hashlib
import hmac
import html
import secrets
import time
from http.cookies import CookieError, SimpleCookie

SESSION_COOKIE = "tunesmith_session"
CSRF_COOKIE = "tunesmith_csrf"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL_S = 7 * 24 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD"})
LOGIN_PATH = "/ui/login"
LOGOUT_PATH = "/ui/logout"
STATIC_PREFIX = "/ui/static/"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "job.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}  # web/static/: served as they are


def parse_cookies(raw: bytes | str | None) -> dict[str, str]:
    if not raw:
        return {}
    jar = SimpleCookie()
    try:
        jar.load(raw.decode("latin-1") if isinstance(raw, bytes) else raw)
    except CookieError:  # a malformed Cookie header is no session, not a server error
        return {}
    return {k: m.value for k, m in jar.items()}


class Auth:
    """Sessions signed with the server's API key (None: no login; every check passes)."""

    def __init__(self, api_key: str | None, ttl_s: int = SESSION_TTL_S):
        self.key = api_key.encode() if api_key else None
        self.ttl_s = ttl_s

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def _mac(self, *parts: str) -> str:
        return hmac.new(self.key, "|".join(parts).encode(), hashlib.sha256).hexdigest()

    def key_matches(self, typed: str) -> bool:
        return self.enabled and hmac.compare_digest(typed.encode(), self.key)

    def new_session(self, now: float | None = None) -> tuple[str, str]:
        """(session cookie value, CSRF token) for a fresh login."""
        issued, nonce = str(int(now if now is not None else time.time())), secrets.token_hex(16)
        return f"{issued}.{nonce}.{self._mac('session', issued, nonce)}", self._mac("csrf", nonce)

    def session_nonce(self, value: str | None, now: float | None = None) -> str | None:
        """The nonce of a valid, unexpired session cookie value, else None."""
        if not self.enabled or not value:
            return None
        issued, _, rest = value.partition(".")
        nonce, _, mac = rest.partition(".")
        if not (issued.isdigit() and nonce and mac):
            return None
        if not hmac.compare_digest(mac, self._mac("session", issued, nonce)):
            return None
        age = (now if now is not None else time.time()) - int(issued)
        return nonce if 0 <= age <= self.ttl_s else None

    def csrf_ok(self, nonce: str, header: str | None) -> bool:
        return bool(header) and hmac.compare_digest(header, self._mac("csrf", nonce))

    def session_check(self, scope, headers: dict) -> bool:
        """The Guard's `session=`: a valid session cookie; methods other than GET/HEAD also need
        the X-CSRF-Token header of that session."""
        nonce = self.session_nonce(parse_cookies(headers.get(b"cookie")).get(SESSION_COOKIE))
        if nonce is None:
            return False
        if scope.get("method", "GET") in SAFE_METHODS:
            return True
        header = headers.get(CSRF_HEADER.encode(), b"").decode("latin-1")
        return self.csrf_ok(nonce, header)

    def logged_in(self, request) -> bool:
        return self.session_nonce(request.cookies.get(SESSION_COOKIE)) is not None


def session_check(api_key: str | None):
    """The Guard's `session=` for a server started with api_key (None: no key, nothing to check)."""
    return Auth(api_key).session_check if api_key else None


# What the Guard answers without a key: the page at / (it shows the login form until there is a
# session), login/logout and the static assets (code and style, nothing from the jobs).
OPEN_PATHS = frozenset({"/", "/favicon.ico", LOGIN_PATH, LOGOUT_PATH, *(STATIC_PREFIX + n for n in STATIC_FILES)})


def set_session_cookies(response, session: str, csrf: str, secure: bool, ttl_s: int = SESSION_TTL_S) -> None:
    response.set_cookie(SESSION_COOKIE, session, max_age=ttl_s, path="/", httponly=True, samesite="strict",
                        secure=secure)
    # Readable by the page's script (not HttpOnly): it is echoed in X-CSRF-Token.
    response.set_cookie(CSRF_COOKIE, csrf, max_age=ttl_s, path="/", httponly=False, samesite="strict",
                        secure=secure)


def clear_session_cookies(response) -> None:
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        response.delete_cookie(name, path="/", samesite="strict")


def login_page(message: str | None = None) -> str:
    note = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>tunesmith: log in</title><link rel="stylesheet" href="{STATIC_PREFIX}style.css"></head>
<body class="login"><main class="card">
<h1>tunesmith</h1><p>This server needs its API key.</p>{note}
<form method="post" action="{LOGIN_PATH}">
<label>API key <input id="key" name="key" type="password" autocomplete="current-password" required autofocus></label>
<button type="submit">Log in</button>
</form></main></body></html>"""
