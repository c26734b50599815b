import KubeObjects
import NetAddress
import ServiceResolution

/// The planner of a long-running agent: keeps each service's resolution and an index of which services
/// claim each `external IP . protocol . port`, so that a change to one Service or EndpointSlice re-resolves
/// that service only, and a conflict (and its end) is found by looking at the keys that service touched.
/// `plan()` assembles the `RulePlan` from the kept pieces (a sort of the mappings, no resolution, chain
/// names cached) so that it is the same value `Planner.plan` gives for the same objects.
///
/// Conflicts never stop an agent: both sides are skipped (as `--on-conflict skip`) and reported.
public struct IncrementalPlanner: Sendable {
    public let planner: Planner
    public let resolver: ServiceResolver
    public let strategy: TargetStrategy

    /// Per service: what resolving it gave on its own.
    private var resolutions: [ObjectName: Resolution] = [:]
    /// Every key any service claims, with the services (and port names) claiming it.
    private var claims: [DispatchKey: [Mapping]] = [:]
    /// Keys claimed by more than one service port.
    private var conflictKeys: Set<DispatchKey> = []
    private var chainCache = Planner.ChainCache()

    public init(settings: PlanSettings, options: ResolutionOptions) {
        var s = settings
        s.onConflict = .skip
        self.planner = Planner(settings: s)
        self.resolver = ServiceResolver(options: options)
        self.strategy = options.target
    }

    /// Number of services currently known.
    public var serviceCount: Int { resolutions.count }

    /// Re-resolves `service` (nil: it is gone) with its slices. Returns whether its resolution changed.
    @discardableResult
    public mutating func update(_ name: ObjectName, service: Service?, slices: [EndpointSlice]) -> Bool {
        let new = service.map { resolver.resolve($0, slices: slices) }
        let old = resolutions[name]
        if old?.mappings == new?.mappings && old?.skipped == new?.skipped && old?.warnings == new?.warnings
            && old?.autoFellBackToClusterIP == new?.autoFellBackToClusterIP { return false }
        if let old {
            for m in old.mappings { removeClaim(m) }
        }
        if let new {
            resolutions[name] = new
            for m in new.mappings { addClaim(m) }
        } else {
            resolutions[name] = nil
        }
        return true
    }

    /// Forgets everything (a relist replaces the store; the caller then updates every service).
    public mutating func removeAll() {
        resolutions = [:]; claims = [:]; conflictKeys = []
    }

    private mutating func addClaim(_ m: Mapping) {
        let key = DispatchKey(m)
        claims[key, default: []].append(m)
        if claims[key]!.count > 1 { conflictKeys.insert(key) }
    }

    private mutating func removeClaim(_ m: Mapping) {
        let key = DispatchKey(m)
        guard var list = claims[key], let i = list.firstIndex(of: m) else { return }
        list.remove(at: i)
        if list.isEmpty { claims[key] = nil } else { claims[key] = list }
        if list.count <= 1 { conflictKeys.remove(key) }
    }

    /// The plan for everything known now. Deterministic: equal to `Planner.plan` of the same objects with
    /// `--on-conflict skip` (the tests compare the two).
    public mutating func plan(extraWarnings: [Diagnostic] = []) -> RulePlan {
        var kept: [Mapping] = []
        var skipped: [SkippedItem] = []
        var warnings: [Diagnostic] = []
        var fellBack: [ObjectName] = []
        kept.reserveCapacity(claims.count)
        for name in resolutions.keys.sorted() {
            let r = resolutions[name]!
            for m in r.mappings where !conflictKeys.contains(DispatchKey(m)) { kept.append(m) }
            skipped += r.skipped
            warnings += r.warnings
            fellBack += r.autoFellBackToClusterIP
        }
        var conflicts: [Conflict] = []
        for key in conflictKeys {
            let (c, items) = Planner.conflict(key, claims[key]!)
            conflicts.append(c)
            skipped += items
        }
        conflicts.sort()
        if let w = ServiceResolver.autoFallbackWarning(fellBack) { warnings.append(w) }
        return planner.assemble(kept: kept, skipped: skipped, conflicts: conflicts, warnings: warnings + extraWarnings,
                                strategy: strategy, chains: &chainCache)
    }
}
