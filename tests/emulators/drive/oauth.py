"""Google's OAuth 2.0 endpoints: the consent page (already agreed to), the token endpoint
(authorization-code and refresh grants), revocation, and bearer-token checks.

Answers are shaped like Google's, so oauth2client turns a revoked refresh token into
``HttpAccessTokenRefreshError("invalid_grant: Token has been expired or revoked.")`` and a
bad code into ``FlowExchangeError("invalid_grant: Malformed auth code.")``.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit

from .resources import error_body
from .state import ACCESS_TOKEN_SECONDS, DriveState
from .wire import Request, Response, json_response

DRIVE_SCOPE = "https://www.googleapis.com/auth/drive"
BEARER_CHALLENGE = 'Bearer realm="https://accounts.google.com/"'


def _form(req: Request) -> dict[str, str]:
    posted = parse_qs(req.body.decode(), keep_blank_values=True)
    return {**req.query, **{k: v[0] for k, v in posted.items()}}


def _oauth_error(status: int, code: str, description: str) -> Response:
    return json_response({"error": code, "error_description": description}, status)


def authorize(state: DriveState, req: Request) -> Response:
    """``GET /o/oauth2/auth``: the consent page, as if the person signed in and clicked Allow.
    Redirects to the loopback ``redirect_uri`` with a one-time code, as Google does."""
    query = req.query
    if query.get("client_id") != state.client_id:
        return _oauth_error(401, "invalid_client", "The OAuth client was not found.")
    redirect = query.get("redirect_uri", "")
    if urlsplit(redirect).hostname not in ("localhost", "127.0.0.1"):
        return _oauth_error(400, "redirect_uri_mismatch", "Desktop clients redirect to loopback.")
    if query.get("response_type") != "code":
        return _oauth_error(400, "unsupported_response_type", "response_type must be code")
    params = {"code": state.issue_auth_code(redirect), "scope": query.get("scope", "")}
    if "state" in query:
        params["state"] = query["state"]
    joiner = "&" if "?" in redirect else "?"
    return Response(302, b"", {"Location": redirect + joiner + urlencode(params)})


def token(state: DriveState, req: Request) -> Response:
    """``POST /token`` (oauth2.googleapis.com) and ``/o/oauth2/token`` (accounts.google.com)."""
    form = _form(req)
    if form.get("grant_type") not in ("refresh_token", "authorization_code"):
        return _oauth_error(400, "unsupported_grant_type",
                            f"Invalid grant_type: {form.get('grant_type', '')}")
    if (form.get("client_id"), form.get("client_secret")) != (state.client_id,
                                                               state.client_secret):
        return _oauth_error(401, "invalid_client", "The OAuth client was not found.")
    if form["grant_type"] == "authorization_code":
        return _exchange_code(state, form)
    if not state.refresh_token_valid(form.get("refresh_token", "")):
        return _oauth_error(400, "invalid_grant", "Token has been expired or revoked.")
    return json_response({"access_token": state.issue_access_token(),
                          "expires_in": ACCESS_TOKEN_SECONDS, "scope": DRIVE_SCOPE,
                          "token_type": "Bearer"})


def _exchange_code(state: DriveState, form: dict[str, str]) -> Response:
    redirect = state.take_auth_code(form.get("code", ""))
    if redirect is None:
        return _oauth_error(400, "invalid_grant", "Malformed auth code.")
    if form.get("redirect_uri") != redirect:
        return _oauth_error(400, "redirect_uri_mismatch", "Bad Request")
    return json_response({"access_token": state.issue_access_token(),
                          "expires_in": ACCESS_TOKEN_SECONDS, "scope": DRIVE_SCOPE,
                          "refresh_token": state.issue_refresh_token(), "token_type": "Bearer"})


def revoke(state: DriveState, req: Request) -> Response:
    """``/revoke?token=…``: revokes a refresh token (and, on Google, its access tokens)."""
    value = _form(req).get("token", "")
    with state.lock:
        known = value in state.refresh_tokens or value in state.access_tokens
        if value in state.refresh_tokens:
            state.refresh_tokens[value] = False
            state.access_tokens.clear()
        state.access_tokens.pop(value, None)
    if not known:
        return _oauth_error(400, "invalid_token", "Token expired or revoked")
    return json_response({})


def unauthorized(state: DriveState, req: Request) -> Response | None:
    """The 401 Drive gives for a missing, unknown or expired bearer token, else None."""
    header = req.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value:
        body = error_body(401, "required", "Login Required", location="Authorization",
                          location_type="header")
    elif not state.access_token_valid(value.strip()):
        body = error_body(401, "authError", "Invalid Credentials", location="Authorization",
                          location_type="header")
    else:
        return None
    return json_response(body, 401, {"WWW-Authenticate": BEARER_CHALLENGE})
