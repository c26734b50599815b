import Foundation
import NIOConcurrencyHelpers

/// What `/healthz` and `/readyz` answer: a status code and a small JSON body.
public struct HealthReport: Sendable, Equatable {
    /// 200 or 503.
    public let status: Int
    /// One JSON object on one line, ending in a newline.
    public let body: String
    public var isHealthy: Bool { status == 200 }
}

/// Liveness and readiness of the sync loop, shared between the loop (writer) and the HTTP server (reader).
///
/// - `/healthz` (liveness) is 200 while the last successful sync is younger than 2 × `syncPeriod`, counting
///   from start-up until the first success, so a node whose API server is briefly unreachable at boot is not
///   restarted at once; 503 after that, with the reason, like kube-proxy's healthz. Because a full sync runs
///   every `syncPeriod` even when nothing changes, a loop that is stuck or keeps failing shows here.
/// - `/readyz` (readiness) is 200 once the first sync has landed in the kernel.
///
/// The body follows kube-proxy's (`lastUpdated`, `currentTime`), plus the reason when unhealthy. Time comes
/// from `now`, so tests move it instead of sleeping.
public final class HealthState: Sendable {
    /// The `--sync-period`; healthy means a success within twice this.
    public let syncPeriod: Duration
    private let now: @Sendable () -> Date

    private struct State {
        var startedAt: Date
        var lastSuccess: Date?
        var lastFailure: String?
    }
    private let state: NIOLockedValueBox<State>

    public init(syncPeriod: Duration, now: @escaping @Sendable () -> Date = { Date() }) {
        self.syncPeriod = syncPeriod
        self.now = now
        state = NIOLockedValueBox(State(startedAt: now()))
    }

    /// A sync landed in the kernel at `at`. Clears the last failure.
    public func syncSucceeded(at: Date) {
        state.withLockedValue { s in
            s.lastSuccess = max(s.lastSuccess ?? at, at)
            s.lastFailure = nil
        }
    }

    /// A sync failed; `reason` (one sentence) is shown by `/healthz` while unhealthy.
    public func syncFailed(reason: String) {
        state.withLockedValue { $0.lastFailure = String(reason.prefix(512)) }
    }

    /// Whether any sync has landed yet (readiness).
    public var firstSyncLanded: Bool { state.withLockedValue { $0.lastSuccess != nil } }

    /// When the last sync landed, if any.
    public var lastSuccess: Date? { state.withLockedValue { $0.lastSuccess } }

    /// The liveness answer at this moment.
    public func healthz() -> HealthReport {
        let (s, current) = (state.withLockedValue { $0 }, now())
        let limit = 2 * Self.seconds(syncPeriod)
        let reference = s.lastSuccess ?? s.startedAt
        let age = current.timeIntervalSince(reference)
        var fields: [(String, String)] = [
            ("lastUpdated", s.lastSuccess.map { Self.quote(RFC3339.format($0)) } ?? "null"),
            ("currentTime", Self.quote(RFC3339.format(current))),
        ]
        guard age > limit else {
            return HealthReport(status: 200, body: Self.object(fields + [("status", "\"ok\"")]))
        }
        var reason = s.lastSuccess == nil
            ? "no sync has succeeded in the \(Self.text(age)) since start-up"
            : "the last successful sync was \(Self.text(age)) ago"
        reason += ", more than 2 × --sync-period (\(Self.text(limit)))"
        if let failure = s.lastFailure { reason += "; last error: \(failure)" }
        fields += [("status", "\"unhealthy\""), ("reason", Self.quote(reason))]
        return HealthReport(status: 503, body: Self.object(fields))
    }

    /// The readiness answer at this moment.
    public func readyz() -> HealthReport {
        let s = state.withLockedValue { $0 }
        if let last = s.lastSuccess {
            return HealthReport(status: 200, body: Self.object([("status", "\"ready\""), ("lastUpdated", Self.quote(RFC3339.format(last)))]))
        }
        var reason = "the first sync has not landed in the kernel yet"
        if let failure = s.lastFailure { reason += "; last error: \(failure)" }
        return HealthReport(status: 503, body: Self.object([("status", "\"not ready\""), ("reason", Self.quote(reason))]))
    }

    // MARK: - Helpers

    static func seconds(_ d: Duration) -> Double {
        let (s, atto) = d.components
        return Double(s) + Double(atto) / 1e18
    }

    /// `1m30s`, `250ms`: the way Go (and so kube-proxy's flags) writes durations.
    static func text(_ seconds: Double) -> String {
        if seconds < 1 { return "\(Int((seconds * 1000).rounded()))ms" }
        var rest = Int(seconds.rounded())
        let h = rest / 3600; rest %= 3600
        let m = rest / 60; let s = rest % 60
        return (h > 0 ? "\(h)h" : "") + (h > 0 || m > 0 ? "\(m)m" : "") + "\(s)s"
    }

    static func object(_ fields: [(String, String)]) -> String {
        "{" + fields.map { "\(quote($0.0)):\($0.1)" }.joined(separator: ",") + "}\n"
    }

    static func quote(_ s: String) -> String { JSONText.quote(s) }
}
