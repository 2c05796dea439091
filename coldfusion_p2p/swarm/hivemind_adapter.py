"""Every override of hivemind internals, in one place: written and checked against hivemind 1.1.12.

ColD Fusion needs several things hivemind's ``DecentralizedAverager`` does not do, and gets them by
overriding or wrapping its internals. Each is listed here with what it changes, so that a hivemind
upgrade is one file to re-diff (:data:`HIVEMIND_VERSION` is the version the overrides were diffed
against; importing this module with another version logs a warning):

* ``DecentralizedAverager.get_current_state`` (public hook): newcomers download a snapshot of the
  *last fused* body and the fusion rule's state, never the live buffers of a round in progress.
* ``DecentralizedAverager._run_allreduce_inplace_`` (private): a modified copy of hivemind's. The
  differences: (1) with ``clipped_mean``/``ties`` our slice is reduced by a
  :class:`~coldfusion_p2p.merge.aggregation.ReferenceReducer` instead of the mean; (2) the deltas are
  applied only if no part failed and no sender was banned (hivemind applies whatever it has, with
  failed slices falling back to local values); (3) hivemind's ``_state_updated`` call after each
  tensor is dropped (our state is the snapshot above, not the buffers); (4) the test-only crash
  and stall faults (:mod:`coldfusion_p2p.swarm.faults`); (5) its runner is a
  :class:`ClientStreamingRunner`, which overrides ``AllReduceRunner.should_delay_results``.
* ``AllReduceRunner.should_delay_results`` (private): hivemind sends a client-mode peer (behind
  NAT) its averaged parts only once it has sent all of its own, and the client reads nothing
  before that: simpler on asymmetric home links, where upload and download share a modem queue,
  but it makes a client's fusion at least twice its upload time. With ``--client-results
  streamed`` a client reads while it sends and its reducers stream to it part by part; each side
  does so only for clients that said so in their gathered info, so a reducer never streams to a
  client that is not reading (which would stall both on flow control).
* ``AllReduceRunner._accumulate_parts_streaming`` (private, wrapped): hivemind's reducer reads a
  sender's next part only after writing back the last averaged one, so on a link that carries both
  (a streamed client's home line) each direction waits on the other; the wrapper reads and reduces in
  a task up to :data:`RESULT_BUFFER_PARTS` parts ahead of the writes.
* ``rpc_join_group``, ``rpc_aggregate_part``, ``rpc_download_state``, ``_step`` and
  ``_aggregate_with_group`` (private): moderated runs check each caller's transport-authenticated
  peer id against the run's invites before hivemind's own handler runs.
* ``Matchmaking.target_group_size`` (private attribute, set per round by
  :meth:`FusedBodyAverager.set_round_group`, like hivemind's own ``_set_group_bits``): when the whole
  swarm is ready its size is known, and the leader starts once that many joined.
* ``hivemind.averaging.allreduce.serialize_torch_tensor`` (module function, wrapped process-wide by
  :func:`count_reducer_bytes`): counts the bytes a reducer returns, since hivemind keeps no byte
  counters; :class:`CountingCompression` counts what a sender sends.
* ``Uniform8BitQuantization.extract`` (replaced in hivemind's deserializer registry,
  ``hivemind.compression.serialization._BASE_COMPRESSION_TYPES``, process-wide): hivemind 1.1.12
  calls ``int()`` on a one-element array there, a TypeError with numpy 2, so no 8-bit part could
  be decoded. :class:`Uniform8Bit` reads the same bytes the same way, without that call.
  Its ``quantize`` (the sending side) replaces hivemind's for two reasons: hivemind's calls
  ``torch.quantize_per_tensor``, deprecated for removal, and with ``allow_inplace`` (how hivemind
  serializes a reducer's results) it builds the codebook from the *centered* values, so every
  decoded part lost its mean. Ours makes the same indices and the codebook of the actual values.
* ``DHTNode.protocol.routing_table`` and ``P2P._client.connect`` (private, read and called by
  :func:`reconnect_initial_peers`): hivemind drops every node that fails to answer from the routing
  table and never re-adds the initial peers, so after a link cut longer than a few requests a node
  can stay alone for good, even once the link is back (seen on the network lab). While a peer sees
  nobody, we connect to the initial peers' addresses again and ping them, as hivemind's own
  bootstrap does; the ping puts them back into the routing table.

hivemind names its RPC handlers after the averager's class, so every node of a run (peers and the
archiving bootstrap) must use :class:`FusedBodyAverager`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import math
import multiprocessing as mp
import os
import signal
from collections.abc import Sequence
from typing import Any, AsyncIterator  # noqa: UP035 (hivemind finds streaming RPCs by typing's alias)

import hivemind
import numpy as np
import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging import allreduce as allreduce_module
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, Uniform8BitQuantization
from hivemind.compression import serialization as serialization_module
from hivemind.compression.quantization import average_buckets
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, get_dht_time
from hivemind.utils.asyncio import as_aiter, azip
from hivemind.utils.multiaddr import Multiaddr

from coldfusion_p2p.config import FusionConfig
from coldfusion_p2p.merge.aggregation import ReferenceReducer, combiner, reference_parts
from coldfusion_p2p.swarm.auth import InviteGate
from coldfusion_p2p.swarm.faults import FAULTS, Faults
from coldfusion_p2p.swarm.policy import group_bits

logger = logging.getLogger(__name__)

HIVEMIND_VERSION = "1.1.12"  # the overrides below were diffed against this release
if hivemind.__version__ != HIVEMIND_VERSION:
    logger.warning(
        "coldfusion-p2p overrides hivemind internals diffed against hivemind %s, but %s is installed: "
        "install hivemind==%s",
        HIVEMIND_VERSION,
        hivemind.__version__,
        HIVEMIND_VERSION,
    )


class Uniform8Bit(Uniform8BitQuantization):
    """hivemind's uniform 8-bit quantization (a 256-entry codebook of bucket means per part, 6 sigma
    wide), with an ``extract`` that works with numpy 2 and a ``quantize`` of our own (see the module
    docstring); the bytes on the wire are hivemind's ``UNIFORM_8BIT``."""

    def quantize(self, tensor: torch.Tensor, allow_inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
        values = tensor.detach().to(torch.float32)
        offset = self.n_bins // 2
        centered = values - values.mean()
        scale = self.RANGE_IN_SIGMAS * float(centered.norm()) / math.sqrt(max(centered.numel() - 1, 1)) / self.n_bins
        steps = torch.round(centered / scale) if scale > 0 else torch.zeros_like(centered)
        steps = torch.nan_to_num(steps, nan=0.0)  # a NaN still decodes to NaN: see the codebook below
        indices = (steps.clamp_(-offset, offset - 1) + offset).to(torch.uint8)
        codebook = average_buckets(values, indices, self.n_bins)  # a NaN value makes its bucket NaN
        return indices.numpy(), codebook.numpy().astype(self.codebook_dtype)

    def extract(self, serialized_tensor):
        buffer = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        indices = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        values = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return values[indices].requires_grad_(serialized_tensor.requires_grad)


serialization_module._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8Bit()  # receivers decode with it

COMPRESSIONS = {"none": NoCompression, "fp16": Float16Compression, "int8": Uniform8Bit}


class CountingCompression(CompressionBase):
    """Wraps a compression to count the bytes of every part this peer serializes to send.

    hivemind keeps no byte counters; parts a peer sends as a sender go through ``compress``, and
    the averaged parts it returns as a reducer through ``serialize_torch_tensor`` of the all-reduce
    module, which :func:`count_reducer_bytes` wraps. The counter lives in shared memory because the
    all-reduce runs in the averager's own process.
    """

    def __init__(self, inner: CompressionBase, counter):
        self.inner, self.counter = inner, counter
        self.compression_type = inner.compression_type

    def compress(self, tensor, info, allow_inplace=False):
        serialized = self.inner.compress(tensor, info, allow_inplace)
        with self.counter.get_lock():
            self.counter.value += serialized.ByteSize()
        return serialized

    def extract(self, serialized_tensor):
        return self.inner.extract(serialized_tensor)

    def estimate_compression_ratio(self, info):
        return self.inner.estimate_compression_ratio(info)


_reducer_counter: list = [None]  # the counter of the averager process about to be forked


def count_reducer_bytes(counter) -> None:
    """Count the averaged parts this process returns as a reducer (see :class:`CountingCompression`).

    Call it right before an averager forks its process: the child keeps the counter set here.
    """
    _reducer_counter[0] = counter
    original = allreduce_module.serialize_torch_tensor
    if getattr(original, "counted", False):
        return

    def counted(*args, **kwargs):
        serialized = original(*args, **kwargs)
        if _reducer_counter[0] is not None:
            with _reducer_counter[0].get_lock():
                _reducer_counter[0].value += serialized.ByteSize()
        return serialized

    counted.counted = True
    allreduce_module.serialize_torch_tensor = counted


RESULT_BUFFER_PARTS = 16  # averaged parts a reducer may hold for a sender that reads slower than it sends


class ClientStreamingRunner(AllReduceRunner):
    """hivemind's runner, streaming results to the client-mode peers in ``streamed_clients``."""

    def __init__(self, *args, streamed_clients: frozenset[PeerID] = frozenset(), **kwargs):
        super().__init__(*args, **kwargs)
        self.streamed_clients = streamed_clients
        self.reducer_errors: dict[PeerID, str] = {}  # why a reducer's results never came (hivemind logs it at debug)

    async def _communicate_with_peer(self, peer_id: PeerID):
        try:
            await super()._communicate_with_peer(peer_id)
        except Exception as error:
            self.reducer_errors[peer_id] = repr(error)[:90]  # records keep 200 characters of a reason
            raise

    def should_delay_results(self, peer_id: PeerID) -> bool:
        return super().should_delay_results(peer_id) and peer_id not in self.streamed_clients

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        """hivemind's, but reading a sender's parts never waits for its results to be written.

        hivemind's loop reads part i+1 of a sender only once it has written the averaged part i back
        to that sender. When both directions share one slow link (a client streaming results on a
        home line) each then waits on the other, and both ran at ~65% of the link on the network lab.
        Here a task reads and reduces while this generator writes, up to ``RESULT_BUFFER_PARTS`` ahead.
        """
        reduced = super()._accumulate_parts_streaming(stream, sender_index)
        results: asyncio.Queue = asyncio.Queue(RESULT_BUFFER_PARTS)

        async def read_and_reduce():
            try:
                async for message in reduced:
                    await results.put(message)
            except Exception as error:  # hivemind's handler reports it and bans the sender, as before
                await results.put(error)
                return
            await results.put(None)

        task = asyncio.create_task(read_and_reduce())
        try:
            while (message := await results.get()) is not None:
                if isinstance(message, Exception):
                    raise message
                yield message
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def gathered_infos(serializer, group_info) -> dict[PeerID, dict]:
    """What each member of the group told it (the ``gather`` of its step); {} for a malformed entry."""
    infos = {}
    for peer_id, gathered in zip(group_info.peer_ids, group_info.gathered, strict=True):
        info = {}
        with contextlib.suppress(Exception):  # a malformed entry: hivemind's own default for that peer
            info = serializer.loads(serializer.loads(gathered)[2])
        infos[peer_id] = info if isinstance(info, dict) else {}
    return infos


def streamed_clients(serializer, group_info) -> frozenset[PeerID]:
    """The group's peers whose gathered info asks for streamed results (``--client-results streamed``)."""
    infos = gathered_infos(serializer, group_info)
    return frozenset(peer_id for peer_id, info in infos.items() if info.get("client_results") == "streamed")


class FusedBodyAverager(DecentralizedAverager):
    """An averager that shares the last fused body (a snapshot) instead of its live buffers, fuses
    all or nothing, and admits only invited peers in moderated runs (see the module docstring).

    The archiving bootstrap uses ``client_mode=True`` to download without serving.
    """

    def __init__(
        self,
        body: Sequence[torch.Tensor],
        dht: DHT,
        *,
        prefix: str,
        config: FusionConfig,
        client_mode: bool = False,
        gate: InviteGate | None = None,
        faults: Faults = FAULTS,
        center: Sequence[torch.Tensor] | None = None,
    ):
        """``center``: what members subtract from their bodies before the all-reduce (lossy codecs:
        see :func:`~coldfusion_p2p.swarm.policy.contribution_kind`); the reducers' reference too."""
        self._center = center
        self._gate = gate  # moderated runs: who may call our RPCs and share a group with us
        self._faults = faults  # read once at process start, never on the hot path
        # (metadata, body, rule state): what newcomers download; the state is empty without momentum
        self._snapshot: tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]] = (
            {"round": 0},
            detached_copy(body),
            [],
        )
        # clipped_mean and ties reduce against the last fused base; shared memory, so the averager's
        # own process (forked below) sees every publish_fused of this one
        self._combine = combiner(config.aggregation, config.clip_ratio)
        self._reference = (
            [tensor.share_memory_() for tensor in detached_copy(body)] if self._combine is not None else None
        )
        self.bytes_sent = mp.Value(ctypes.c_uint64, 0)  # every serialized part this peer sends
        count_reducer_bytes(self.bytes_sent)  # before the averager process forks
        super().__init__(
            averaged_tensors=detached_copy(body),
            dht=dht,
            start=False,
            prefix=prefix,
            initial_group_bits=group_bits(0),
            target_group_size=None,  # everyone who is ready inside the window joins one group
            min_group_size=2,
            min_matchmaking_time=config.matchmaking_time,
            request_timeout=config.request_timeout,
            allreduce_timeout=config.allreduce_timeout,
            next_chunk_timeout=config.next_chunk_timeout,
            sender_timeout=config.next_chunk_timeout,
            reducer_timeout=2 * config.next_chunk_timeout,  # hivemind requires reducer > sender
            declare_state_period=max(2.0, min(30.0, config.matchmaking_time * 2)),
            client_mode=client_mode,
            compression=CountingCompression(COMPRESSIONS[config.compression](), self.bytes_sent),
            shutdown_timeout=3,
        )
        self.run_in_background(await_ready=True, timeout=60)

    def publish_fused(
        self,
        round_number: int,
        body: Sequence[torch.Tensor],
        metadata: dict[str, Any],
        state: Sequence[torch.Tensor] = (),
    ) -> None:
        """Make ``body`` (a fused base of ``round_number``) and the fusion rule's ``state`` that goes
        with it what newcomers download from this peer."""
        if state:
            metadata = {**metadata, "state_tensors": len(state)}
        self._snapshot = ({**metadata, "round": round_number}, detached_copy(body), detached_copy(state))
        if self._reference is not None:
            with torch.no_grad():
                for index, (reference, tensor) in enumerate(zip(self._reference, body, strict=True)):
                    reference.copy_(tensor if self._center is None else tensor - self._center[index])
        if self.client_mode:  # serves nobody (nobody could connect to it); keeps the snapshot for itself
            return
        # newest rounds are asked first; among equals, bodies really averaged in a group
        self.state_sharing_priority = 2.0 * round_number + (2.0 if metadata.get("group_size", 0) >= 2 else 1.0)

    def get_current_state(self):
        """The snapshot: the body's tensors, then ``metadata["state_tensors"]`` tensors of rule state."""
        metadata, body, state = self._snapshot
        return metadata, [*body, *state] if state else body, None

    def set_round_group(self, group_bits: str, group_size: int | None) -> None:
        """This round's group key bits and, when known, its size: hivemind's matchmaking then lets a
        leader start the all-reduce once ``group_size`` peers joined (its ``target_group_size``, fixed
        at construction in hivemind, set per round here) instead of at the scheduled time."""
        future = MPFuture()
        request = dict(group_bits=group_bits, group_size=group_size, future=future)
        self._outer_pipe.send(("_set_round_group", [], request))
        future.result()

    async def _set_round_group(self, group_bits: str, group_size: int | None, future: MPFuture) -> None:
        try:  # in the averager's own process, between its steps
            self._matchmaking.group_key_manager.group_bits = group_bits
            self._matchmaking.target_group_size = group_size
            future.set_result(None)
        except Exception as error:
            if not future.done():
                future.set_exception(error)

    def last_fused_body(self) -> list[torch.Tensor]:
        """The body this round started from (the last fused base); never modified in place."""
        return self._snapshot[1]

    def last_fused_state(self) -> list[torch.Tensor]:
        """The fusion rule's state that belongs to :meth:`last_fused_body` (empty without momentum)."""
        return self._snapshot[2]

    # ---- moderated runs: hivemind's averager RPCs carry no auth, so each one checks the caller's
    # (transport-authenticated) peer id against the run's invites; refusals use codes hivemind
    # never sends itself for these requests, so a refused caller just moves on.
    async def _refuses(self, context: P2PContext) -> bool:
        return self._gate is not None and not await self._gate.admits(context.remote_id)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if await self._refuses(context):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if await self._refuses(context):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_aggregate_part(stream, context):
            yield response

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if await self._refuses(context):
            return  # as hivemind denies a download: the caller asks the next peer
        async for response in super().rpc_download_state(request, context):
            yield response

    async def _step(self, **kwargs):
        if self._gate is not None:  # learn the swarm's invites now, not while a joining peer waits
            self._gate.refresh_soon()
        return await super()._step(**kwargs)

    async def _aggregate_with_group(self, group_info, *args, **kwargs):
        """Never send our parts to a group with an uninvited member (e.g. a leader that slipped in)."""
        uninvited: list[PeerID] = [] if self._gate is None else await self._gate.uninvited(group_info.peer_ids)
        if uninvited:
            raise AllreduceException(f"group has {len(uninvited)} uninvited member(s): not averaging with it")
        own = gathered_infos(self.serializer, group_info).get(self.peer_id, {})
        if self._faults.loses_attempt(own.get("round", 0), "start"):  # test-only: counted, but gone
            raise AllreduceException("left the group before sending (test fault)")
        return await super()._aggregate_with_group(group_info, *args, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        """Like hivemind's, but all or nothing: apply the deltas only if no part failed or lost a sender."""
        group_id = group_info.group_id if group_id is None else group_id
        own = gathered_infos(self.serializer, group_info).get(self.peer_id, {})
        crash = self._faults.crashes_in(own.get("round", 0), own.get("stage"))  # test-only
        runner = ClientStreamingRunner(
            streamed_clients=streamed_clients(self.serializer, group_info),
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        if self._reference is not None:  # reduce our slice with the run's rule instead of the mean
            runner.tensor_part_reducer = ReferenceReducer(
                tuple(part.shape for part in runner.parts_for_local_averaging),
                len(runner.sender_peer_ids),
                reference_parts(self._reference, runner.tensor_part_container, group_info.peer_ids.index(self.peer_id)),
                self._combine,
            )
        self._running_groups[group_id].set_result(runner)
        deltas = []
        async for _, update in azip(as_aiter(*tensors), runner):
            deltas.append(update)
            if crash:  # test-only: die like a machine mid all-reduce
                os.killpg(os.getpgid(0), signal.SIGKILL)
            await self._faults.stall_in_allreduce()  # test-only: a window to cut our link in
        failed = runner.tensor_part_container.failed_size
        if failed or runner.banned_senders:
            why = "".join(f" ({peer.to_base58()[-8:]}: {error})" for peer, error in runner.reducer_errors.items())
            raise AllreduceException(
                f"incomplete all-reduce: {failed} values fell back to local ones{why}, "
                f"{len(runner.banned_senders)} sender(s) dropped"
            )
        if self._faults.loses_attempt(own.get("round", 0), "end"):  # test-only: ours alone fails, the others' completed
            raise AllreduceException("incomplete all-reduce: our last part came too late (test fault)")
        for tensor, delta in zip(tensors, deltas, strict=True):
            tensor.add_(delta, alpha=self._averaging_alpha)
        self.last_updated = get_dht_time()


def reconnect_initial_peers(dht: DHT, initial_peers: Sequence[str], timeout: float = 5.0) -> bool:
    """Connect to and ping the initial peers again (see the module docstring); True if the routing
    table was empty before and is not now."""
    return dht.run_coroutine(functools.partial(_reconnect, initial_peers=list(initial_peers), timeout=timeout))


async def _reconnect(_dht: DHT, node, initial_peers: list[str], timeout: float) -> bool:
    was_alone = len(node.protocol.routing_table.uid_to_peer_id) == 0
    for address in initial_peers:
        maddr = Multiaddr(address)
        peer_id = PeerID.from_base58(maddr["p2p"])
        with contextlib.suppress(Exception):  # unreachable still: the next look tries again
            transport = maddr.decapsulate(Multiaddr(f"/p2p/{maddr['p2p']}"))
            await asyncio.wait_for(node.p2p._client.connect(peer_id, [transport]), timeout)
            await asyncio.wait_for(node.protocol.call_ping(peer_id), timeout)
    rejoined = was_alone and len(node.protocol.routing_table.uid_to_peer_id) > 0
    if rejoined:
        logger.info("the DHT had lost every node (a cut link?); rejoined through the initial peers")
    return rejoined


def detached_copy(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [tensor.detach().cpu().clone() for tensor in tensors]  # the averager works on CPU tensors
