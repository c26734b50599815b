import KubeObjects
import NetAddress
import ServiceResolution

/// The planner of a long-running agent: keeps each service's resolution and an index of which services
/// claim each `external IP . protocol . port`, so that a change to one Service or EndpointSlice re-resolves
/// that service only, and a conflict (and its end) is found by looking at the keys that service touched.
/// `plan()` assembles the `RulePlan` from the kept pieces (a sort of small keys, no resolution, chain
/// names cached) so that it is the same value `Planner.plan` gives for the same objects.
///
/// Conflicts never stop an agent: both sides are skipped (as `--on-conflict skip`) and reported.
public struct IncrementalPlanner: Sendable {
    public let planner: Planner
    public let resolver: ServiceResolver
    public let strategy: TargetStrategy

    /// Per service, sorted by name: what resolving it gave on its own, and its target chains (named once,
    /// when it changes). One sorted array rather than dictionaries: `plan()` walks it in order and reads the
    /// pieces in place, without hashing 10k names or copying what it does not keep.
    private var entries: [Entry] = []
    private struct Entry: Sendable {
        let name: ObjectName
        var resolution: Resolution
        var chains: ServiceChains
    }
    /// Every key any service claims, with the services (and port names) claiming it.
    private var claims: [DispatchKey: [Mapping]] = [:]
    /// Keys claimed by more than one service port.
    private var conflictKeys: Set<DispatchKey> = []

    public init(settings: PlanSettings, options: ResolutionOptions) {
        var s = settings
        s.onConflict = .skip
        self.planner = Planner(settings: s)
        self.resolver = ServiceResolver(options: options)
        self.strategy = options.target
    }

    /// Number of services currently known.
    public var serviceCount: Int { entries.count }

    /// Re-resolves `service` (nil: it is gone) with its slices. Returns whether its resolution changed.
    @discardableResult
    public mutating func update(_ name: ObjectName, service: Service?, slices: [EndpointSlice]) -> Bool {
        let at = insertionIndex(name)
        let present = at < entries.count && entries[at].name == name
        let old = present ? entries[at].resolution : nil
        var new = service.map { resolver.resolve($0, slices: slices) }
        if let o = old, new != nil { new!.mappings = Self.keepingSlots(new!.mappings, from: o.mappings) }
        if old?.mappings == new?.mappings && old?.skipped == new?.skipped && old?.warnings == new?.warnings
            && old?.autoFellBackToClusterIP == new?.autoFellBackToClusterIP { return false }
        if let old {
            for m in old.mappings { removeClaim(m) }
        }
        if let new {
            let entry = Entry(name: name, resolution: new, chains: ServiceChains(new.mappings, planner: planner))
            if present { entries[at] = entry } else { entries.insert(entry, at: at) }
            for m in new.mappings { addClaim(m) }
        } else if present {
            entries.remove(at: at)
        }
        return true
    }

    /// Endpoints keep their slots across changes: a destination that stays stays at its index; a new one
    /// takes the place of one that went; when there are fewer, the last ones move into the holes. So one
    /// endpoint replaced rewrites one slot per mapping, and one removed rewrites at most two (instead of every
    /// slot after it, as a sorted list would): the kernel update stays a handful of elements. The order is
    /// the agent's own history, so its plan can differ from a one-shot plan in endpoint order only; the
    /// spread over endpoints is the same (a uniform pick over the same set).
    static func keepingSlots(_ mappings: [Mapping], from previous: [Mapping]) -> [Mapping] {
        struct Key: Hashable { let port: String; let proto: TransportProtocol; let family: IPFamily }
        var before: [Key: [Destination]] = [:]
        for m in previous {
            if case .endpoints(let d) = m.target { before[Key(port: m.portName, proto: m.protocol, family: m.family)] = d }
        }
        guard !before.isEmpty else { return mappings }
        var arranged: [Key: [Destination]] = [:]
        return mappings.map { m in
            guard case .endpoints(let fresh) = m.target else { return m }
            let key = Key(port: m.portName, proto: m.protocol, family: m.family)
            guard let old = before[key], old != fresh else { return m }
            let slots: [Destination]
            if let done = arranged[key] {
                slots = done
            } else {
                slots = arrange(fresh, after: old)
                arranged[key] = slots
            }
            return m.replacingTarget(.endpoints(slots))
        }
    }

    /// `fresh` (sorted) laid out over `old`'s slots (see `keepingSlots`).
    static func arrange(_ fresh: [Destination], after old: [Destination]) -> [Destination] {
        let keep = Set(fresh)
        var slots: [Destination?] = old.map { keep.contains($0) ? $0 : nil }
        let placed = Set(slots.compactMap { $0 })
        var incoming = fresh.filter { !placed.contains($0) }[...]
        for i in slots.indices where slots[i] == nil {
            guard let d = incoming.popFirst() else { break }
            slots[i] = d
        }
        slots += incoming.map { Optional($0) }
        // Fewer than before: move the last destinations into the holes left.
        var result: [Destination] = []
        var tail = slots.count - 1
        var i = 0
        while i <= tail {
            if let d = slots[i] {
                result.append(d)
            } else {
                while tail > i && slots[tail] == nil { tail -= 1 }
                if tail > i { result.append(slots[tail]!); tail -= 1 }
            }
            i += 1
        }
        return result
    }

    private func insertionIndex(_ name: ObjectName) -> Int {
        var lo = 0, hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[mid].name < name { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// One service's target chains, sorted as the plan orders them within a service (family, port name,
    /// protocol), and the chain of each of its mappings.
    struct ServiceChains: Sendable {
        var chains: [TargetChain] = []
        var chainOfMapping: [Int] = []

        init(_ mappings: [Mapping], planner: Planner) {
            var index: [Planner.ChainKey: Int] = [:]
            var firsts: [Mapping] = []
            var local: [Int] = []
            for m in mappings {
                let key = Planner.ChainKey(m)
                if let i = index[key] { local.append(i); continue }
                index[key] = firsts.count
                local.append(firsts.count)
                firsts.append(m)
            }
            let order = firsts.indices.sorted {
                let (a, b) = (firsts[$0], firsts[$1])
                return (a.family, a.portName, a.protocol) < (b.family, b.portName, b.protocol)
            }
            var position = [Int](repeating: 0, count: firsts.count)
            for (p, i) in order.enumerated() { position[i] = p }
            chains = order.map { planner.targetChain(for: firsts[$0]) }
            chainOfMapping = local.map { position[$0] }
        }
    }

    /// The dispatch order as integers: family, address, protocol number, port.
    private struct RuleOrder: Comparable {
        let family: UInt8, high: UInt64, low: UInt64, protoPort: UInt32
        init(_ m: Mapping) {
            family = m.family == .ipv4 ? 0 : 1; high = m.externalIP.high; low = m.externalIP.low
            protoPort = UInt32(m.protocol.number) << 16 | UInt32(truncatingIfNeeded: m.port)
        }
        static func < (a: RuleOrder, b: RuleOrder) -> Bool {
            (a.family, a.high, a.low, a.protoPort) < (b.family, b.high, b.low, b.protoPort)
        }
    }

    /// Forgets everything (a relist replaces the store; the caller then updates every service).
    public mutating func removeAll() {
        entries = []; claims = [:]; conflictKeys = []
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
    /// `--on-conflict skip` (the tests compare the two). Assembled from the kept pieces without sorting
    /// strings: services are kept in order, each with its chains already named and ordered, and the
    /// dispatch rules are ordered by integer keys.
    public mutating func plan(extraWarnings: [Diagnostic] = []) -> RulePlan {
        var skipped: [SkippedItem] = []
        var warnings: [Diagnostic] = []
        var fellBack: [ObjectName] = []
        var chains: [TargetChain] = []
        // Each rule as its sort key and where its mapping is (entry, mapping index): sorting these small values
        // and then copying each mapping once is cheaper than sorting the mappings.
        var order: [(order: RuleOrder, entry: Int32, mapping: Int32, chain: Int32)] = []
        order.reserveCapacity(claims.count)
        chains.reserveCapacity(claims.count)
        let anyConflict = !conflictKeys.isEmpty
        let conflictKeys = self.conflictKeys
        entries.withUnsafeBufferPointer { es in
            for e in es.indices {
                skipped += es[e].resolution.skipped
                warnings += es[e].resolution.warnings
                fellBack += es[e].resolution.autoFellBackToClusterIP
            }
            // Chains go family by family, then by service (and within it by port name and protocol): the
            // order `Planner` sorts them in. A chain exists when at least one of its mappings is not in conflict.
            var global: [Int] = [], used: [Bool] = []
            for family in [IPFamily.ipv4, .ipv6] {
                for e in es.indices {
                    es[e].resolution.mappings.withUnsafeBufferPointer { ms in
                        func counts(_ mi: Int) -> Bool {
                            ms[mi].family == family && !(anyConflict && conflictKeys.contains(DispatchKey(ms[mi])))
                        }
                        guard ms.indices.contains(where: counts) else { return }
                        global.removeAll(keepingCapacity: true)
                        let chainCount = es[e].chains.chains.count
                        global.append(contentsOf: repeatElement(-1, count: chainCount))
                        used.removeAll(keepingCapacity: true)
                        used.append(contentsOf: repeatElement(false, count: chainCount))
                        for mi in ms.indices where counts(mi) { used[es[e].chains.chainOfMapping[mi]] = true }
                        for ci in 0..<chainCount where used[ci] {
                            global[ci] = chains.count
                            chains.append(es[e].chains.chains[ci])
                        }
                        for mi in ms.indices where counts(mi) {
                            order.append((RuleOrder(ms[mi]), Int32(e), Int32(mi), Int32(global[es[e].chains.chainOfMapping[mi]])))
                        }
                    }
                }
            }
        }
        order.sort { $0.order < $1.order }
        var rules: [PlannedRule] = []
        rules.reserveCapacity(order.count)
        entries.withUnsafeBufferPointer { es in
            for o in order {
                rules.append(PlannedRule(mapping: es[Int(o.entry)].resolution.mappings[Int(o.mapping)], targetIndex: Int(o.chain)))
            }
        }
        var conflicts: [Conflict] = []
        for key in conflictKeys {
            let (c, items) = Planner.conflict(key, claims[key]!)
            conflicts.append(c)
            skipped += items
        }
        conflicts.sort()
        if let w = ServiceResolver.autoFallbackWarning(fellBack) { warnings.append(w) }
        return RulePlan(settings: planner.settings, strategy: strategy, rules: rules,
                        targetChains: chains, skipped: skipped.sorted(), conflicts: conflicts,
                        warnings: warnings + extraWarnings)
    }
}
