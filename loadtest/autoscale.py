"""Check the autoscaling thresholds: replay a recorded load ramp through a model of the pods and of the HPA.

    python -m loadtest.autoscale                      # derive the threshold, replay docs/loadtest/ramp.csv, plot
    python -m loadtest.autoscale --single-sps 900 --saturated-sps 4200 --saturated-batch 28   # GPU figures

Not a cluster test. Each pod is the service's batcher (one queue, a batch leaves when full or when its head has
waited max_wait_ms, batches run one at a time, `max_queue` admitted at most, `timeout_s` deadline), with a batch
costing a + c * size seconds fitted to the measured per-pod capacity (`Capacity`). Requests reach the ready pods
at random (kube-proxy). Every 15 s the HPA reads the p90 of `fastast_queue_wait_seconds` over the last minute,
computed like Prometheus' histogram_quantile over the service's own buckets, and applies Kubernetes' scaling
algorithm with the behaviour (windows, policies) read from the shipped ScaledObject. New pods serve after
`--startup-s`; removed pods take no new requests and finish their queue.

Threshold derivation (`derive_threshold`): the p90 queue wait one pod shows at TARGET_UTILISATION of its capacity
under Poisson arrivals, rounded to whole milliseconds. The HPA keeps the p90 near the threshold, so it keeps each pod
near that utilisation; the headroom above it absorbs the load that arrives while a new pod starts.
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import yaml

from fastast.serving.metrics import LATENCY_BUCKETS
from fastast.serving.settings import ServeSettings
from loadtest.ramp import read_sent_times

ROOT = Path(__file__).resolve().parents[1]
SCALED_OBJECT = ROOT / "docker" / "kubernetes" / "overlays" / "autoscale" / "scaledobject.yaml"
RAMP_CSV = ROOT / "docs" / "loadtest" / "ramp.csv"
TARGET_UTILISATION = 0.7  # of one pod's capacity, where the p90 queue wait is the threshold
P99_TARGET_S = 1.0  # the FastASTHighP99Latency alert's threshold (docker/prometheus/rules.yml)
HPA_SYNC_S = 15.0  # the HPA controller's period (--horizontal-pod-autoscaler-sync-period)
HPA_TOLERANCE = 0.1  # no change while the metric is within 10 % of the target
RATE_WINDOW_S = 60.0  # the [1m] of the query
SCRAPE_LAG_S = 5.0  # the PodMonitor's scrape interval: the newest observations are up to one scrape old


@dataclass(frozen=True)
class Capacity:
    """Per-pod throughput as measured with `loadtest.sweep`: one closed-loop client, and many at saturation.

    Defaults: docs/BENCHMARKS.md, "Serving: the service at saturation vs fastast bench", quiet rerun 2026-11-27,
    r=0 (the slowest r): 26.8 S/s with 1 client; 49.5 S/s with 32 clients at a mean batch of 20.9; batch cap 32,
    max_wait_ms 5. A 2-core CPU: re-measure on the GPU you deploy and pass those figures instead.
    """

    single_sps: float = 26.8
    saturated_sps: float = 49.5
    saturated_batch: float = 20.9
    max_batch_size: int = 32
    max_wait_s: float = 0.005

    @property
    def per_sample_s(self) -> float:
        """c: the cost each extra request adds to a batch."""
        return (self.saturated_batch / self.saturated_sps - self.batch_time_1) / (self.saturated_batch - 1)

    @property
    def batch_time_1(self) -> float:
        """A lone request's batch time: its round trip less the max_wait_ms it waited for company."""
        return 1.0 / self.single_sps - self.max_wait_s

    def batch_time(self, size: int) -> float:
        return self.batch_time_1 + self.per_sample_s * (size - 1)

    @property
    def requests_per_s(self) -> float:
        """What one pod sustains: full batches back to back."""
        return self.max_batch_size / self.batch_time(self.max_batch_size)


class Observations:
    """What Prometheus and the clients see, in 5 s slots (one scrape interval): queue waits by batch start, and
    every request's latency by its arrival (inf: refused with 429/503, or timed out with 504)."""

    SLOT_S = 5.0

    def __init__(self) -> None:
        self.waits: dict[int, list[float]] = defaultdict(list)
        self.latencies: dict[int, list[float]] = defaultdict(list)

    def wait(self, at: float, seconds: float) -> None:
        self.waits[int(at // self.SLOT_S)].append(seconds)

    def outcome(self, arrived: float, seconds: float) -> None:
        self.latencies[int(arrived // self.SLOT_S)].append(seconds)

    def waits_in(self, start: float, stop: float) -> list[float]:
        return self._slots(self.waits, start, stop)

    def latencies_in(self, start: float, stop: float) -> list[float]:
        return self._slots(self.latencies, start, stop)

    def _slots(self, slots: dict[int, list[float]], start: float, stop: float) -> list[float]:
        first, last = round(start / self.SLOT_S), round(stop / self.SLOT_S)
        return [value for slot in range(first, last) for value in slots.get(slot, ())]


class Pod:
    """One `fastast serve`: the batcher of fastast.serving.batcher for a single r, in simulated time."""

    def __init__(self, capacity: Capacity, settings: ServeSettings, ready_at: float):
        self.capacity = capacity
        self.max_queue = settings.max_queue
        self.timeout_s = settings.timeout_s
        self.ready_at = ready_at
        self.removed = False
        self.queue: deque[float] = deque()  # arrival times, admitted and waiting for a batch
        self.pending: deque[float] = deque()  # routed here, not yet arrived in simulated time
        self.free_at = 0.0  # when the running batch ends

    @property
    def idle_after(self) -> float:
        return self.free_at if not (self.queue or self.pending) else math.inf

    def advance(self, until: float, seen: Observations) -> None:
        """Run every batch that starts before `until`."""
        cap, limit = self.capacity, self.capacity.max_batch_size
        while self.queue or (self.pending and self.pending[0] < until):
            if not self.queue:
                self._admit(self.pending.popleft(), seen)
                continue
            start = max(self.free_at, self.queue[0] + cap.max_wait_s)
            if len(self.queue) >= limit:
                start = max(self.free_at, self.queue[limit - 1])
            while self.pending and self.pending[0] <= start and self.pending[0] < until:
                t = self.pending.popleft()
                self._admit(t, seen)
                if len(self.queue) == limit:
                    start = max(self.free_at, t)
            if start >= until:
                return
            batch = []
            while self.queue and len(batch) < limit and self.queue[0] <= start:
                arrived = self.queue.popleft()
                if start - arrived >= self.timeout_s:
                    seen.outcome(arrived, math.inf)  # 504
                else:
                    batch.append(arrived)
            if not batch:
                continue
            self.free_at = start + cap.batch_time(len(batch))
            for arrived in batch:
                seen.wait(start, start - arrived)
                seen.outcome(arrived, self.free_at - arrived)

    def _admit(self, t: float, seen: Observations) -> None:
        if len(self.queue) >= self.max_queue:
            seen.outcome(t, math.inf)  # 429
        else:
            self.queue.append(t)


def histogram_quantile(q: float, values: list[float], buckets: tuple[float, ...] = LATENCY_BUCKETS) -> float:
    """Prometheus' histogram_quantile over these observations: linear within the bucket; NaN for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    counts = [bisect.bisect_right(ordered, upper) for upper in buckets] + [len(ordered)]
    rank = q * len(ordered)
    index = next(i for i, count in enumerate(counts) if count >= rank)
    if index == len(buckets):
        return buckets[-1]  # the +Inf bucket answers with the highest finite bound
    lower, below = (0.0, 0) if index == 0 else (buckets[index - 1], counts[index - 1])
    return lower + (buckets[index] - lower) * (rank - below) / (counts[index] - below)


def poisson(rate: float, seconds: float, rng: random.Random) -> list[float]:
    times, t = [], rng.expovariate(rate)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def derive_threshold(
    capacity: Capacity,
    utilisation: float = TARGET_UTILISATION,
    settings: ServeSettings | None = None,
    seconds: float = 1200.0,
) -> float:
    """The p90 queue wait (s, whole ms) of one pod at `utilisation` of its capacity; deterministic."""
    pod = Pod(capacity, settings or ServeSettings(), ready_at=0.0)
    seen = Observations()
    pod.pending.extend(poisson(utilisation * capacity.requests_per_s, seconds, random.Random(1)))
    pod.advance(math.inf, seen)
    return round(histogram_quantile(0.9, seen.waits_in(0.0, seconds + 60.0)), 3)


# ---- the HPA (KEDA creates one from the ScaledObject) ----


@dataclass(frozen=True)
class Policy:
    kind: str  # Pods or Percent
    value: int
    period_s: float


@dataclass(frozen=True)
class ScalingRule:
    threshold: float
    min_replicas: int
    max_replicas: int
    up_window_s: float
    up_policies: tuple[Policy, ...]
    down_window_s: float
    down_policies: tuple[Policy, ...]

    @classmethod
    def from_scaled_object(cls, path: Path = SCALED_OBJECT) -> ScalingRule:
        spec = yaml.safe_load(path.read_text())["spec"]
        [trigger] = spec["triggers"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]

        def policies(direction: str) -> tuple[Policy, ...]:
            return tuple(Policy(p["type"], p["value"], p["periodSeconds"]) for p in behavior[direction]["policies"])

        return cls(
            threshold=float(trigger["metadata"]["threshold"]),
            min_replicas=spec["minReplicaCount"],
            max_replicas=spec["maxReplicaCount"],
            up_window_s=behavior["scaleUp"]["stabilizationWindowSeconds"],
            up_policies=policies("scaleUp"),
            down_window_s=behavior["scaleDown"]["stabilizationWindowSeconds"],
            down_policies=policies("scaleDown"),
        )


class HPA:
    """Kubernetes' replica calculation for one External metric of target type Value, with `behavior`.

    Policies of one direction combine with selectPolicy Max (the default): the one allowing the largest change.
    """

    def __init__(self, rule: ScalingRule):
        self.rule = rule
        self.recommendations: list[tuple[float, int]] = []
        self.events: list[tuple[float, int]] = []  # (time, replica change)

    def desired(self, now: float, current: int, metric: float) -> int:
        rule = self.rule
        ratio = metric / rule.threshold
        raw = current if abs(ratio - 1.0) <= HPA_TOLERANCE else math.ceil(current * ratio)
        self.recommendations = [
            (t, r) for t, r in self.recommendations if now - t < max(rule.up_window_s, rule.down_window_s)
        ]
        self.recommendations.append((now, raw))
        up = min(r for t, r in self.recommendations if now - t <= rule.up_window_s)
        down = max(r for t, r in self.recommendations if now - t <= rule.down_window_s)
        target = min(max(current, up), down)
        if target > current:
            target = min(target, self._up_limit(now, current), rule.max_replicas)
        elif target < current:
            target = max(target, self._down_limit(now, current), rule.min_replicas)
        target = min(max(target, rule.min_replicas), rule.max_replicas)
        if target != current:
            self.events.append((now, target - current))
        return target

    def _period_start(self, now: float, current: int, period_s: float) -> int:
        return current - sum(change for t, change in self.events if now - t < period_s)

    def _up_limit(self, now: float, current: int) -> int:
        limits = []
        for p in self.rule.up_policies:
            start = self._period_start(now, current, p.period_s)
            limits.append(start + p.value if p.kind == "Pods" else math.ceil(start * (1 + p.value / 100)))
        return max(max(limits), current)

    def _down_limit(self, now: float, current: int) -> int:
        limits = []
        for p in self.rule.down_policies:
            start = self._period_start(now, current, p.period_s)
            limits.append(start - p.value if p.kind == "Pods" else int(start * (1 - p.value / 100)))
        return min(min(limits), current)


# ---- the replay ----


@dataclass(frozen=True)
class Step:
    """One HPA period: offered load, pods, what the HPA read, and what clients saw."""

    t: float
    offered_rps: float
    ready: int
    replicas: int
    metric_s: float
    p99_s: float
    failed: int  # refused (429/503) or timed out


def replay_arrivals(
    sent_times: list[float], rate_scale: float, time_scale: float, smooth_s: int = 5, seed: int = 2
) -> list[float]:
    """Poisson arrivals at the recording's rate times `rate_scale`, its timeline stretched `time_scale`x.

    The recorded rate of each second is the mean count over the `smooth_s` seconds around it: a single second of a
    small recording is mostly Poisson noise, which stretching would turn into minute-long bursts.
    """
    rng = random.Random(seed)
    seconds = int(math.ceil(max(sent_times))) + 1
    counts = [0] * seconds
    for t in sent_times:
        counts[int(t)] += 1
    arrivals = []
    for second in range(seconds):
        around = counts[max(0, second - smooth_s // 2) : second + smooth_s // 2 + 1]
        rate = sum(around) / len(around) * rate_scale
        if rate > 0:
            arrivals += [second * time_scale + t for t in poisson(rate, time_scale, rng)]
    return arrivals


def simulate(
    arrivals: list[float],
    rule: ScalingRule,
    capacity: Capacity,
    startup_s: float,
    settings: ServeSettings | None = None,
    autoscale: bool = True,
    seed: int = 3,
) -> list[Step]:
    """Replay `arrivals` (sorted, seconds) against pods scaled by `rule`; one Step per HPA period."""
    settings = settings or ServeSettings()
    rng = random.Random(seed)
    hpa = HPA(rule)
    pods = [Pod(capacity, settings, ready_at=0.0) for _ in range(rule.min_replicas)]
    seen = Observations()
    timeline: list[tuple[float, float, int, int, float]] = []
    end = (arrivals[-1] if arrivals else 0.0) + rule.down_window_s + 10 * HPA_SYNC_S
    now, next_arrival = 0.0, 0
    while now < end:
        until = now + HPA_SYNC_S
        ready = [p for p in pods if not p.removed and p.ready_at <= now]
        first = next_arrival
        while next_arrival < len(arrivals) and arrivals[next_arrival] < until:
            if ready:
                rng.choice(ready).pending.append(arrivals[next_arrival])
            else:
                seen.outcome(arrivals[next_arrival], math.inf)  # no ready endpoint: 503
            next_arrival += 1
        for pod in pods:
            pod.advance(until, seen)
        pods = [p for p in pods if not (p.removed and p.idle_after <= until)]
        metric = histogram_quantile(0.9, seen.waits_in(until - SCRAPE_LAG_S - RATE_WINDOW_S, until - SCRAPE_LAG_S))
        metric = 0.0 if math.isnan(metric) else metric  # the query's `or vector(0)`: no traffic, no queue
        if autoscale:
            active = [p for p in pods if not p.removed]
            pods += _scale(active, hpa.desired(until, len(active), metric), capacity, settings, until + startup_s)
        timeline.append(
            (until, (next_arrival - first) / HPA_SYNC_S, len(ready), sum(1 for p in pods if not p.removed), metric)
        )
        now = until
    steps = []
    for t, offered, ready_count, replicas, metric in timeline:  # outcomes are complete only now
        latencies = seen.latencies_in(t - HPA_SYNC_S, t)
        served = [x for x in latencies if x != math.inf]
        steps.append(
            Step(t, offered, ready_count, replicas, metric, percentile(served, 99), len(latencies) - len(served))
        )
    return steps


def _scale(active: list[Pod], desired: int, capacity: Capacity, settings: ServeSettings, ready_at: float) -> list[Pod]:
    """The pods to add (serving from `ready_at`); or marks the youngest removed (unready first), as a ReplicaSet does."""
    for pod in sorted(active, key=lambda p: -p.ready_at)[: max(0, len(active) - desired)]:
        pod.removed = True
    return [Pod(capacity, settings, ready_at) for _ in range(desired - len(active))]


def percentile(values: list[float], q: float) -> float:
    """Nearest rank; NaN for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def plot(steps: list[Step], rule: ScalingRule, capacity: Capacity, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.t / 60 for s in steps]
    fig, (ax_load, ax_pods, ax_lat) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax_load.plot(minutes, [s.offered_rps for s in steps], label="offered load (req/s)")
    ax_load.plot(minutes, [s.ready * capacity.requests_per_s for s in steps], label="capacity of ready pods (req/s)")
    ax_load.plot(
        minutes,
        [s.ready * capacity.requests_per_s * TARGET_UTILISATION for s in steps],
        ":",
        label=f"{TARGET_UTILISATION:.0%} of it (target utilisation)",
    )
    ax_load.set(ylabel="requests/s", title=title)
    ax_pods.step(minutes, [s.replicas for s in steps], where="post", label="replicas (desired)")
    ax_pods.step(minutes, [s.ready for s in steps], where="post", label="ready pods")
    ax_pods.axhline(rule.max_replicas, color="grey", lw=0.8, ls="--", label="maxReplicaCount")
    ax_pods.set(ylabel="pods")
    ax_lat.semilogy(minutes, [s.p99_s for s in steps], label="expected p99 latency")
    ax_lat.semilogy(minutes, [max(s.metric_s, 1e-3) for s in steps], label="p90 queue wait (the HPA's metric)")
    ax_lat.axhline(P99_TARGET_S, color="red", lw=0.8, ls="--", label="p99 target (alert)")
    ax_lat.axhline(rule.threshold, color="green", lw=0.8, ls="--", label="threshold")
    ax_lat.set(xlabel="minutes", ylabel="seconds")
    for ax, where in ((ax_load, "upper left"), (ax_pods, "upper left"), (ax_lat, "lower left")):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc=where, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.autoscale", description=__doc__.splitlines()[0])
    default = Capacity()
    parser.add_argument("--single-sps", type=float, default=default.single_sps, help="S/s of one pod, 1 client")
    parser.add_argument("--saturated-sps", type=float, default=default.saturated_sps, help="S/s of one pod, saturated")
    parser.add_argument("--saturated-batch", type=float, default=default.saturated_batch, help="mean batch then")
    parser.add_argument("--max-batch-size", type=int, default=default.max_batch_size)
    parser.add_argument("--max-wait-ms", type=float, default=default.max_wait_s * 1000)
    parser.add_argument("--ramp", type=Path, default=RAMP_CSV, help="a recording by loadtest.ramp")
    parser.add_argument("--rate-scale", type=float, default=5.0, help="replayed load = recorded load x this")
    parser.add_argument("--time-scale", type=float, default=12.0, help="replayed ramp lasts this many times longer")
    parser.add_argument("--startup-s", type=float, default=90.0, help="pod start to ready (pull, load, warm-up)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "loadtest" / "autoscale.png")
    args = parser.parse_args(argv)

    capacity = Capacity(
        args.single_sps, args.saturated_sps, args.saturated_batch, args.max_batch_size, args.max_wait_ms / 1000
    )
    rule = ScalingRule.from_scaled_object()
    derived = derive_threshold(capacity)
    print(
        f"batch time = {capacity.batch_time_1 * 1000:.1f} ms + {capacity.per_sample_s * 1000:.2f} ms x (size - 1); "
        f"capacity {capacity.requests_per_s:.1f} req/s per pod"
    )
    print(
        f"threshold: p90 queue wait at {TARGET_UTILISATION:.0%} = {derived:.3f} s (ScaledObject: {rule.threshold:.3f} s)"
    )
    arrivals = replay_arrivals(read_sent_times(args.ramp), args.rate_scale, args.time_scale)
    steps = simulate(arrivals, rule, capacity, args.startup_s)
    worst = max(s.p99_s for s in steps if not math.isnan(s.p99_s))
    print(
        f"replay: {len(arrivals)} requests, peak {max(s.replicas for s in steps)} replicas, worst p99 {worst:.2f} s, "
        f"{sum(s.failed for s in steps)} failed"
    )
    title = (
        f"{args.ramp.name} x{args.rate_scale:g} load, {args.time_scale:g}x slower; pod {capacity.requests_per_s:.0f} "
        f"req/s, ready {args.startup_s:.0f} s after start; threshold {rule.threshold * 1000:.0f} ms"
    )
    plot(steps, rule, capacity, args.out, title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
