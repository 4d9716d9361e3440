"""The bearer-token dependency of the collector's routers (one check for every area).

The middleware (collector/middleware.py) checks the token before a body is read; this dependency
checks it again and documents the scheme in the OpenAPI spec.
"""

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .middleware import Secret


def bearer_auth(secret: Secret) -> list:
    """``dependencies=`` for a route that needs the token (401 otherwise)."""
    bearer = HTTPBearer(auto_error=False)

    def authorized(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if cred is None or not hmac.compare_digest(cred.credentials.encode(), secret.value):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return [Depends(authorized)]
