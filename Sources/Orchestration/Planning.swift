import KubeObjects
import NetlinkBackend
import NodeBackend
import RulePlanning
import ServiceResolution

/// Resolution and planning for the one-shot commands: the same stages the agent runs, on one snapshot.
public enum Planning {
    /// objects → resolution → plan. Conflicts are bad data (65) unless `settings.onConflict` is skip;
    /// invalid settings are usage errors (64).
    public static func plan(_ objects: ClusterObjects, options: ResolutionOptions, settings: PlanSettings) throws(PipelineError) -> RulePlan {
        var resolution = ServiceResolver(options: options).resolve(objects)
        if let w = ignoredKindsDiagnostic(objects) { resolution.warnings.append(w) }
        do {
            return try Planner(settings: settings).plan(resolution, strategy: options.target)
        } catch {
            switch error {
            case .conflicts: throw PipelineError(.dataError, error.description)
            case .invalidSetting: throw PipelineError(.usage, error.description)
            }
        }
    }

    static func ignoredKindsDiagnostic(_ objects: ClusterObjects) -> Diagnostic? {
        guard !objects.ignoredKinds.isEmpty else { return nil }
        let kinds = objects.ignoredKinds.sorted { $0.key < $1.key }.map { "\($0.key) (\($0.value))" }.joined(separator: ", ")
        return Diagnostic(.info, .ignoredKinds,
                          "ignored \(objects.ignoredKinds.values.reduce(0, +)) object(s) of other kinds: \(kinds)")
    }

    /// What `--target auto` means on this node, and why; other targets are returned as they are.
    public struct TargetDecision: Sendable {
        public var strategy: TargetStrategy
        /// Why auto picked it (nil when the target was explicit).
        public var reason: String?
        public var detection: ProxyDetection?
    }

    public static func decideTarget(_ requested: TargetStrategy, backend: Backend, context: NodeContext,
                                    haveEndpointSlices: Bool) throws(PipelineError) -> TargetDecision {
        guard requested == .auto else { return TargetDecision(strategy: requested, reason: nil, detection: nil) }
        let found: ProxyDetection
        do { found = try ProxyDetection.detect(in: context) } catch { throw PipelineError(error) }
        let (picked, why) = found.strategy(backend: backend, haveEndpointSlices: haveEndpointSlices)
        return TargetDecision(strategy: picked, reason: why, detection: found)
    }

    /// A plan for this node: `auto` decided by looking at the node, and refused before anything reaches the
    /// kernel when the backend cannot carry it (a kube-proxy jump in nftables).
    public struct NodePlan: Sendable {
        public var plan: RulePlan
        public var target: TargetDecision
    }

    public static func planForNode(_ objects: ClusterObjects, options: ResolutionOptions, settings: PlanSettings,
                                   backend: Backend, context: NodeContext) throws(PipelineError) -> NodePlan {
        var options = options
        let decision = try decideTarget(options.target, backend: backend, context: context,
                                        haveEndpointSlices: !objects.endpointSlices.isEmpty)
        options.target = decision.strategy
        let plan = try plan(objects, options: options, settings: settings)
        if backend == .nftables, let why = plan.nftablesRefusal {
            throw PipelineError(.usage, why)
        }
        return NodePlan(plan: plan, target: decision)
    }
}

extension PipelineError {
    public init(_ e: NodeError) { self.init(code: e.exitCode, e.description) }
}
