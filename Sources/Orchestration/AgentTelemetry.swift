import AgentOperations
import Foundation
import KubernetesAPI

/// What the agent does, as Prometheus metrics and health: the one `SyncObserver` of `hostnet-dnat sync`.
/// Metrics and the log line come from the same `SyncReport`, so they never disagree.
public struct AgentTelemetry: SyncObserver {
    public let metrics: AgentMetrics
    public let health: HealthState

    public init(metrics: AgentMetrics, health: HealthState) {
        self.metrics = metrics; self.health = health
    }

    public func syncSucceeded(_ report: SyncReport) {
        metrics.syncFinished(kind: report.kind == .full ? .full : .partial, duration: report.duration,
                             mappingsByFamily: report.mappingsByFamily,
                             skippedByReason: Dictionary(uniqueKeysWithValues: report.skippedByReason.map { ($0.key.rawValue, $0.value) }),
                             at: report.at)
        if report.conntrackDeleted > 0 { metrics.conntrackEntriesDeleted(report.conntrackDeleted) }
        for latency in report.programmingLatencies { metrics.networkProgrammed(latency: latency) }
        if report.inStepWithAPI {
            health.syncSucceeded(at: report.at)
        } else {
            health.syncFailed(reason: "the rules were synced, but the API is unreachable: they may be stale")
        }
    }

    public func syncFailed(kind: SyncReport.Kind, reason: String, message: String) {
        metrics.syncFailed(reason: reason)
        health.syncFailed(reason: message)
    }

    public func sourceEvent(_ event: SourceEvent) {
        switch event {
        case .watchRestarted(let resource, let reason):
            metrics.watchRestarted(resource: resource.rawValue, reason: reason.rawValue)
        case .unavailable(let resource, let error, _):
            metrics.syncFailed(reason: "api_unavailable")
            health.syncFailed(reason: "\(resource.rawValue): \(error.description)")
        default:
            break
        }
    }
}
