import CoreMetrics
import Foundation
import NIOConcurrencyHelpers
import Prometheus

/// Which pass of the sync loop finished: `full` rebuilds and reads the kernel back (first sync, `--sync-period`,
/// fallback after an error), `partial` applies only what changed.
public enum SyncKind: String, Sendable, CaseIterable {
    case full
    case partial
}

/// The agent's Prometheus metrics, recorded through swift-metrics into one `PrometheusCollectorRegistry`.
///
/// The names and labels are part of the interface (dashboards and alerts are written against them); they
/// mirror kube-proxy's (`sync_proxy_rules_duration_seconds`, `network_programming_duration_seconds`, …) so both
/// can sit on one dashboard. Nothing is registered globally: each instance owns or is given a registry, so
/// tests make their own and the process never depends on `MetricsSystem.bootstrap`.
///
/// Every method is cheap (atomics and one short lock) and safe from any thread: the sync loop calls them
/// inline; the HTTP server calls `exposition()`.
public final class AgentMetrics: Sendable {
    /// The registry the metrics live in; `/metrics` is its text exposition.
    public let registry: PrometheusCollectorRegistry
    /// The swift-metrics factory writing into `registry`: other code can create more metrics with it
    /// (`Counter(label:dimensions:factory:)`) and they show up on the same `/metrics`.
    public let factory: PrometheusMetricsFactory

    /// kube-proxy's `sync_proxy_rules_duration_seconds` buckets: 1 ms doubling to 16.4 s.
    public static let syncDurationBuckets: [Duration] = (0..<15).map { .microseconds(1000 << $0) }
    /// kube-proxy's `network_programming_duration_seconds` buckets (0.25 s … 300 s), with finer ones below
    /// 250 ms because an event-driven agent is expected to land changes in tens of milliseconds.
    public static let networkProgrammingBuckets: [Duration] = {
        var b: [Duration] = [1, 2.5, 5, 10, 25, 50, 100].map { .microseconds(Int64($0 * 1000)) }
        b += [.milliseconds(250), .milliseconds(500)]
        b += (1...59).map { .seconds($0) }
        b += stride(from: 60, through: 115, by: 5).map { .seconds($0) }
        b += stride(from: 120, through: 300, by: 30).map { .seconds($0) }
        return b
    }()

    /// Distinct values kept per label before further ones are counted as `other`: labels come from typed
    /// reasons, but a bug or a hostile input must not grow the registry without bound.
    public static let maxLabelValues = 64

    private let syncDuration: [SyncKind: CoreMetrics.Timer]
    private let networkProgramming: CoreMetrics.Timer
    private let conntrackDeleted: CoreMetrics.Counter
    private let lastSuccess: CoreMetrics.Gauge
    private let process: ProcessMetrics?

    private struct LabelledState {
        var mappings: [String: CoreMetrics.Gauge] = [:]
        var skipped: [String: CoreMetrics.Gauge] = [:]
        var syncErrors: [String: CoreMetrics.Counter] = [:]
        var watchRestarts: [String: CoreMetrics.Counter] = [:]
    }
    private let state = NIOLockedValueBox(LabelledState())

    /// - Parameters:
    ///   - registry: where the metrics are registered; a fresh one by default.
    ///   - processMetrics: also export `process_*` (resident memory, CPU seconds, start time, open fds) read from
    ///     /proc at each scrape; swift-prometheus does not offer them. Off where /proc is missing.
    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry(), processMetrics: Bool = true) {
        self.registry = registry
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.durationHistogramBuckets = [
            "hostnet_dnat_sync_duration_seconds": Self.syncDurationBuckets,
            "hostnet_dnat_network_programming_duration_seconds": Self.networkProgrammingBuckets,
        ]
        self.factory = factory
        var durations: [SyncKind: CoreMetrics.Timer] = [:]
        for kind in SyncKind.allCases {
            durations[kind] = CoreMetrics.Timer(label: "hostnet_dnat_sync_duration_seconds",
                                                dimensions: [("kind", kind.rawValue)], factory: factory)
        }
        syncDuration = durations
        networkProgramming = CoreMetrics.Timer(label: "hostnet_dnat_network_programming_duration_seconds", factory: factory)
        conntrackDeleted = CoreMetrics.Counter(label: "hostnet_dnat_conntrack_entries_deleted_total", factory: factory)
        lastSuccess = CoreMetrics.Gauge(label: "hostnet_dnat_last_successful_sync_timestamp_seconds", factory: factory)
        process = processMetrics && FileManager.default.fileExists(atPath: "/proc/self/stat") ? ProcessMetrics(factory: factory) : nil
        // Both families present from the start, so a dashboard shows 0 rather than "no data" before the first sync.
        state.withLockedValue { s in
            for family in ["ipv4", "ipv6"] {
                s.mappings[family] = CoreMetrics.Gauge(label: "hostnet_dnat_mappings", dimensions: [("family", family)], factory: factory)
            }
        }
    }

    /// A sync landed in the kernel.
    /// - Parameters:
    ///   - mappingsByFamily: mappings installed now, e.g. `["ipv4": 120, "ipv6": 40]`; families left out are 0.
    ///   - skippedByReason: every skip reason with its count *now*; reasons left out (gone since the last sync)
    ///     are set to 0, so the gauge never keeps a stale count.
    ///   - at: when it landed (the kernel commit); `hostnet_dnat_last_successful_sync_timestamp_seconds`.
    public func syncFinished(kind: SyncKind, duration: Duration, mappingsByFamily: [String: Int],
                             skippedByReason: [String: Int], at: Date) {
        syncDuration[kind]?.recordNanoseconds(Self.nanoseconds(duration))
        let factory = self.factory
        state.withLockedValue { s in
            Self.setAll(&s.mappings, to: mappingsByFamily) {
                CoreMetrics.Gauge(label: "hostnet_dnat_mappings", dimensions: [("family", $0)], factory: factory)
            }
            Self.setAll(&s.skipped, to: skippedByReason) {
                CoreMetrics.Gauge(label: "hostnet_dnat_skipped", dimensions: [("reason", $0)], factory: factory)
            }
        }
        lastSuccess.record(at.timeIntervalSince1970)
    }

    /// A sync failed (nothing or not everything reached the kernel); `reason` is a short stable word such as
    /// `kernel`, `api`, `conflict`.
    public func syncFailed(reason: String) {
        let factory = self.factory
        counter(\.syncErrors, key: reason) {
            CoreMetrics.Counter(label: "hostnet_dnat_sync_errors_total", dimensions: [("reason", $0)], factory: factory)
        }.increment()
    }

    /// A watch ended and was started again. `resource`: `services` | `endpointslices`; `reason`: `timeout`
    /// (the server closed it as asked), `gone` (410: relist), `error` (connection or decoding trouble).
    public func watchRestarted(resource: String, reason: String) {
        let factory = self.factory
        let key = "\(resource)\u{0}\(reason)"
        counter(\.watchRestarts, key: key) { key in
            let parts = key.split(separator: "\u{0}", omittingEmptySubsequences: false).map(String.init)
            return CoreMetrics.Counter(label: "hostnet_dnat_watch_restarts_total",
                                       dimensions: [("resource", parts[0]), ("reason", parts.count > 1 ? parts[1] : "other")],
                                       factory: factory)
        }.increment()
    }

    /// UDP conntrack entries deleted because their mapping's endpoints changed.
    public func conntrackEntriesDeleted(_ n: Int) {
        if n > 0 { conntrackDeleted.increment(by: Int64(n)) }
    }

    /// The network-programming latency of one change: from the EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time` (or when the Service change was seen) to the kernel
    /// commit. Negative values (clock skew between the control plane and the node) count as 0.
    public func networkProgrammed(latency: Duration) {
        networkProgramming.recordNanoseconds(max(0, Self.nanoseconds(latency)))
    }

    /// `networkProgrammed(latency:)` from two wall-clock times.
    public func networkProgrammed(triggeredAt: Date, committedAt: Date) {
        let seconds = committedAt.timeIntervalSince(triggeredAt)
        networkProgrammed(latency: .nanoseconds(Int64((seconds * 1e9).rounded())))
    }

    /// Parses `endpoints.kubernetes.io/last-change-trigger-time` (RFC 3339, with or without fractional
    /// seconds, as the endpointslice controller writes it). Nil when absent or malformed: then there is no
    /// latency to report, as in kube-proxy.
    public static func lastChangeTriggerTime(_ annotation: String?) -> Date? {
        guard let annotation else { return nil }
        return RFC3339.parse(annotation)
    }

    /// The Prometheus text exposition (format 0.0.4) of everything in the registry, process metrics
    /// refreshed first.
    public func exposition() -> String {
        process?.refresh()
        return registry.emitToString()
    }

    /// The content type of `exposition()`.
    public static let expositionContentType = "text/plain; version=0.0.4; charset=utf-8"

    // MARK: - Helpers

    private static func nanoseconds(_ d: Duration) -> Int64 {
        let (s, atto) = d.components
        let (mul, overflow) = s.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return s < 0 ? .min : .max }
        return mul.addingReportingOverflow(atto / 1_000_000_000).partialValue
    }

    private static func boundedKey<V>(_ key: String, in dict: [String: V]) -> String {
        dict[key] != nil || dict.count < maxLabelValues ? key : "other"
    }

    /// Sets every known gauge from `values` (0 when absent), creating gauges for new keys.
    private static func setAll(_ gauges: inout [String: CoreMetrics.Gauge], to values: [String: Int],
                               make: (String) -> CoreMetrics.Gauge) {
        var totals: [String: Int] = [:]
        for (key, n) in values.sorted(by: { $0.key < $1.key }) {
            let known = gauges[key] != nil || totals[key] != nil
            let room = Set(gauges.keys).union(totals.keys).count < maxLabelValues
            totals[known || room ? key : "other", default: 0] += n
        }
        for (key, _) in totals where gauges[key] == nil { gauges[key] = make(key) }
        for (key, gauge) in gauges { gauge.record(Double(totals[key] ?? 0)) }
    }

    private func counter(_ path: WritableKeyPath<LabelledState, [String: CoreMetrics.Counter]>, key: String,
                         make: (String) -> CoreMetrics.Counter) -> CoreMetrics.Counter {
        state.withLockedValue { s in
            let key = Self.boundedKey(key, in: s[keyPath: path])
            if let c = s[keyPath: path][key] { return c }
            let c = make(key)
            s[keyPath: path][key] = c
            return c
        }
    }
}
