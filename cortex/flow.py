"""Flow control shared by both sides of the proxy (the API server, the node pool).

aiohttp's ``StreamReader`` calls its protocol's ``resume_reading()`` after every
read, paused or not, and ``BaseProtocol.resume_reading`` then re-enters
``data_received(b"")`` (a parser call) and resumes the transport: twice per
relayed request, for nothing. Mixed in before an aiohttp protocol class, this
lets a resume through only when reading is paused.
"""

from __future__ import annotations

from aiohttp.base_protocol import BaseProtocol


class ResumeWhenPaused(BaseProtocol):
    __slots__ = ()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused:
            super().resume_reading(resume_parser)
