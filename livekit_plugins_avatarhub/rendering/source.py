"""What to render, decided once: the avatar, its model, the credentials and the size.

Every input of a start is checked and every environment fallback read here, into one frozen
value that the loader, the hub and the runtime take as given: nothing on the way from
``AvatarSession(avatar_id=...)`` to the first frame decides a fact a second time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .._redact import redact
from ..config import bithuman_secret, bithuman_token, runtime_auth_url
from ..exceptions import ConfigurationError
from ..ids import check_avatar, check_model, download_family, is_demo
from .runtime import check_output_size


@dataclass(frozen=True, repr=False)
class AvatarSource:
    """One avatar to open: ``"demo"``, an agent code (with ``family``, the model family to fetch;
    None for the agent's own, or to be chosen for a cloud-only ``model``) or a model file."""

    avatar_id: str | None
    model_path: Path | None = None
    model: str | None = None
    family: str | None = None
    api_secret: str | None = None
    api_token: str | None = None
    api_url: str | None = None
    output_size: tuple[int, int] | None = None

    @classmethod
    def decide(
        cls,
        avatar_id: str | None = None,
        *,
        model_path: str | os.PathLike[str] | None = None,
        model: str | None = None,
        api_secret: str | None = None,
        api_token: str | None = None,
        api_url: str | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> AvatarSource:
        """Check everything and fill in the environment's values (``BITHUMAN_API_SECRET``, ...)."""
        if (avatar_id is None) == (model_path is None):
            raise ConfigurationError(
                "pass avatar_id= ('demo' or an agent code) or model_path=, one of them"
            )
        model = check_model(model)
        return cls(
            avatar_id=check_avatar(avatar_id) if avatar_id is not None else None,
            model_path=Path(model_path).expanduser() if model_path is not None else None,
            model=model,
            family=download_family(model),
            api_secret=bithuman_secret(api_secret),
            api_token=bithuman_token(api_token),
            api_url=runtime_auth_url(api_url),
            output_size=check_output_size(output_size) if output_size is not None else None,
        )

    @property
    def is_demo(self) -> bool:
        return is_demo(self.avatar_id)

    @property
    def name(self) -> str:
        """How logs name it: the id, or the model file's name."""
        return self.avatar_id or (self.model_path.name if self.model_path else "")

    def __repr__(self) -> str:
        what = (
            f"avatar_id={self.avatar_id!r}" if self.avatar_id else f"model_path={self.model_path}"
        )
        return (
            f"AvatarSource({what}, model={self.model!r}, api_secret={redact(self.api_secret)}, "
            f"api_token={redact(self.api_token)})"
        )
