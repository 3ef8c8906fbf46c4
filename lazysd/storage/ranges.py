"""Byte runs -> storage requests: coalescing, splitting and the knobs of remote reads.

Pure functions of plain values (no I/O, nothing remote imported): the remote reader issues
exactly the requests :func:`coalesce` returns, and the dry-run plans count them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class RemoteOptions:
    """How remote reads are issued (``VirtualStateDict(url, remote=RemoteOptions(...))``).

    Attributes:
        max_requests: ranged GETs in flight at once, per checkpoint (all reader threads).
        request_bytes: largest single GET; longer runs are split into parallel parts.
            Also bounds the response bytes held per request (staging is at most
            ``max_requests * request_bytes``).
        gap_bytes: two runs closer than this are fetched in one GET, the gap read and dropped...
        max_waste: ...as long as the dropped bytes stay under this fraction of the useful ones,
            so a coalesced load requests at most ``1 + max_waste`` times the planned bytes.
        header_bytes: first GET of each file, speculative: the 8-byte length and the header
            in one request when the header is smaller (a second GET fetches the rest).
        retries: attempts after the first for a transient failure (timeout, connection
            dropped, 5xx, throttling), with exponential backoff from ``backoff`` seconds...
        retry_seconds: ...and never past this many seconds in total for one request.
        connect_timeout / read_timeout: seconds to connect, and to wait for data.
    """

    max_requests: int = 16
    request_bytes: int = 8 * MiB
    gap_bytes: int = 1 * MiB
    max_waste: float = 0.01
    header_bytes: int = 256 << 10
    retries: int = 6
    backoff: float = 0.1
    retry_seconds: float = 30.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


@dataclass(frozen=True)
class Request:
    """One ranged GET ``[start, end)`` of a file and where its pieces go.

    ``pieces`` are ``(out_offset, file_offset, length)``: bytes ``[file_offset, +length)``
    of the response land at ``out_offset`` of the caller's buffer.
    """

    start: int
    end: int
    pieces: tuple[tuple[int, int, int], ...]


def coalesce(runs: list[tuple[int, int]], options: RemoteOptions = RemoteOptions()) -> list[Request]:
    """Requests that fetch ``runs`` (``(file_offset, length)``, read back to back into one buffer).

    Runs are split to at most ``request_bytes``; neighbours (in file order) are merged while
    the gap between them is at most ``gap_bytes``, the merged request stays within
    ``request_bytes``, and the gap bytes read in total stay within ``max_waste`` of the
    useful bytes of the request.

    Example:
        >>> [(r.start, r.end) for r in coalesce([(0, 10_000), (10_050, 10_000), (10_000_000, 5)])]
        [(0, 20050), (10000000, 10000005)]
    """
    pieces: list[tuple[int, int, int]] = []
    pos = 0
    for offset, length in runs:
        done = 0
        while done < length:
            n = min(options.request_bytes, length - done)
            pieces.append((pos + done, offset + done, n))
            done += n
        pos += length
    pieces.sort(key=lambda p: p[1])
    out: list[Request] = []
    group: list[tuple[int, int, int]] = []
    start = end = useful = 0
    for piece in pieces:
        _, offset, n = piece
        if group:
            gap = offset - end
            waste = (end - start - useful) + max(gap, 0)
            if (
                0 <= gap <= options.gap_bytes
                and offset + n - start <= options.request_bytes
                and waste <= options.max_waste * (useful + n)
            ):
                group.append(piece)
                end, useful = offset + n, useful + n
                continue
            out.append(Request(start, end, tuple(group)))
        group, start, end, useful = [piece], offset, offset + n, n
    if group:
        out.append(Request(start, end, tuple(group)))
    return out
