import Foundation
import KubeObjects
import NetAddress
@testable import NodeBackend
@testable import RulePlanning
import RuleRendering
import ServiceResolution
import Testing

/// The desired rules built straight from a plan, against the renderer's text (the other path), and the
/// restore files an update writes. Pure.
@Suite struct IptablesDesiredTests {
    /// kube-proxy's `%0.10f` as written, and what iptables-save 1.8.9 (legacy and nft) printed back for it.
    @Test func probabilitiesReadBackAsSavePrintsThem() {
        let cases: [(Int, String, String)] = [(2, "0.5000000000", "0.50000000000"), (3, "0.3333333333", "0.33333333349"),
                                              (7, "0.1428571429", "0.14285714272")]
        for (n, written, saved) in cases {
            #expect(Probabilities.written(n) == written)
            #expect(Probabilities.savedForm(written: written) == saved, "1/\(n)")
        }
        var p = Probabilities()
        #expect(p.saved(3) == "0.33333333349" && p.saved(3) == "0.33333333349")
    }

    @Test func commentsAreQuotedLikeXtablesSaveString() {
        #expect(IptablesDesired.saveQuoted("default/web:http") == #""default/web:http""#)
        #expect(IptablesDesired.saveQuoted("plain_Name-1") == "plain_Name-1")
        #expect(IptablesDesired.saveQuoted("") == #""""#)
        #expect(IptablesDesired.saveQuoted(#"a"b'c\d e"#) == #""a\"b\'c\\d e""#)
    }

    /// Same chains, same rules in the same order as the renderer's file, once both are normalised; and the
    /// desired lines already are in the spelling save prints (`--ctorigdst` without a prefix, 11 decimals).
    @Test(arguments: [TargetStrategy.endpoints, .clusterIP, .kubeProxy])
    func desiredRulesEqualTheRenderedFile(strategy: TargetStrategy) throws {
        let plan = try NodeFixtures.plan(strategy: strategy)
        for family in IPFamily.allCases {
            let desired = IptablesDesired(plan: plan, family: family)
            // No mappings in a family (no IPv6 ClusterIP here): nothing of ours there at all.
            if plan.rules(family).isEmpty { #expect(desired.isEmpty && desired.chainOrder.isEmpty); continue }
            let rendered = SavedRuleset.parse(IptablesRenderer.render(plan, family: family, options: .init(includeJumps: false))).table("nat")!
            #expect(desired.chainOrder == rendered.chainOrder, "\(strategy) \(family)")
            for chain in rendered.chainOrder {
                let want = rendered.rules(chain).map(RuleNormalizer.normalize)
                let have = desired.rules(chain).map { RuleNormalizer.normalize(SavedRuleset.tokenize($0)) }
                #expect(have == want, "\(strategy) \(family) \(chain)")
            }
            #expect(desired.mappings == plan.rules(family).count)
        }
        if strategy == .endpoints {
            let v4 = IptablesDesired(plan: plan, family: .ipv4)
            #expect(v4.rules("HOSTNET-DNAT-MASQ") == ["-m conntrack --ctstate DNAT --ctorigdst 203.0.113.10 -j MASQUERADE"])
            #expect(v4.allRules.contains { $0.contains("--probability 0.50000000000 -j DNAT") })
        }
    }

    @Test func savedRulesetReadsTargetsAndRunsOfRules() {
        let nat = SavedRuleset.parse(NodeBackendUnitTests.dump).table("nat")!
        #expect(nat.rules("OUTPUT").map(\.target) == ["KUBE-SERVICES", "HOSTNET-DNAT", "OTHER-DNAT", "HOSTNET-DNAT"])
        #expect(nat.rules("HOSTNET-DNAT").first?.text
                == #"-d 203.0.113.10/32 -p tcp -m tcp --dport 80 -m comment --comment "default/web:http" -j HNDNAT-OLD"#)
        #expect(SavedRuleset.jumpTarget(#"-m comment --comment "x -j NOT" -j REAL"#) == "REAL")
        #expect(SavedRuleset.jumpTarget("-p tcp") == nil)
        // Rules of one chain split over two runs still end up together, in order.
        let split = SavedRuleset.parse("*nat\n-A A -j X\n-A B -j Y\n-A A -j Z\nCOMMIT\n").table("nat")!
        #expect(split.rules("A").map(\.target) == ["X", "Z"] && split.chainOrder == ["A", "B"])
    }

    /// The update's restore file, from the plan applied before and the live jumps: only the changed target
    /// chain when an endpoint goes; the dispatch and masquerade chains plus deletion when a service goes.
    @Test func updateScriptsNameOnlyWhatChanged() throws {
        let backend = IptablesBackend(context: NodeContext(), variant: .nft, variantReason: "test")
        let hooks = IptablesOwned(family: .ipv4, saved: SavedRuleset.parse(
            "*nat\n-A OUTPUT -j HOSTNET-DNAT\n-A POSTROUTING -j HOSTNET-DNAT-MASQ\nCOMMIT\n"), settings: PlanSettings())
        let full = try NodeFixtures.plan(families: [.ipv4])
        let one = try NodeFixtures.plan(families: [.ipv4], endpoints4: [Net.endpoints4[1]])
        let installed = IptablesOwned(family: .ipv4, installed: IptablesDesired(plan: full, family: .ipv4), hooks: hooks)
        let r = backend.restoreScript(IptablesDesired(plan: one, family: .ipv4), installed, full.settings)
        #expect(Set(r.written) == Set(full.targetChains.map(\.iptablesName)) && r.deleted.isEmpty)
        #expect(!r.script.contains("HOSTNET-DNAT") && !r.script.contains("OUTPUT"))
        #expect(r.script.contains("-j DNAT --to-destination 198.51.100.6:8080") && !r.script.contains("198.51.100.5"))
        #expect(backend.differences(IptablesDesired(plan: full, family: .ipv4), installed, full.settings).isEmpty)

        let none = try NodeFixtures.plan(families: [.ipv6])
        let removed = backend.restoreScript(IptablesDesired(plan: none, family: .ipv4), installed, full.settings)
        #expect(removed.script.contains("-D OUTPUT -j HOSTNET-DNAT\n") && removed.script.contains("-X HOSTNET-DNAT\n"))
        #expect(removed.deleted.count == 2 + full.targetChains.count)
    }

    /// A partial update assumes the jumps are where the last full apply put them and never touches them; a
    /// rollback after it (the other family's restore failed) must not move them either: their real position
    /// (after kube-proxy's KUBE-SERVICES) is unknown to it, and `-I OUTPUT 1` would put ours first.
    @Test func aRollbackLeavesAssumedJumpsAlone() throws {
        let backend = IptablesBackend(context: NodeContext(), variant: .nft, variantReason: "test")
        let settings = PlanSettings()
        let full = try NodeFixtures.plan(families: [.ipv4])
        let assumed = IptablesOwned(family: .ipv4, installed: IptablesDesired(plan: full, family: .ipv4),
                                    hooks: IptablesOwned(family: .ipv4, jumpsInPlace: settings))
        #expect(assumed.jumpsAssumed && assumed.outputJumpInPlace(settings))
        let now = IptablesOwned(family: .ipv4, saved: SavedRuleset.parse(
            "*nat\n-A OUTPUT -j KUBE-SERVICES\n-A OUTPUT -j HOSTNET-DNAT\n-A POSTROUTING -j HOSTNET-DNAT-MASQ\nCOMMIT\n"), settings: settings)
        let script = backend.rollbackScript(before: assumed, now: now)
        #expect(!script.contains("OUTPUT") && !script.contains("POSTROUTING"), "\(script)")
        #expect(script.contains(":HOSTNET-DNAT - [0:0]"))
        // Jumps that were read are put back where they were.
        let read = IptablesOwned(family: .ipv4, saved: SavedRuleset.parse(
            "*nat\n-A OUTPUT -j KUBE-SERVICES\n-A OUTPUT -j HOSTNET-DNAT\nCOMMIT\n"), settings: settings)
        #expect(backend.rollbackScript(before: read, now: now).contains("-I OUTPUT 2 -j HOSTNET-DNAT"))
    }
}

/// The update's fast path (`chainUpdate`, from the two plans) against the general one (the complete rules
/// of both plans compared chain by chain): the same restore file, the same differences, the same chains
/// written and deleted, for each kind of change and both families. Pure.
@Suite struct ChainUpdateTests {
    struct Shape {
        var services = 6
        var endpoints = 3
        var moved: Int? = nil            // this service's first endpoint is replaced
        var dropped: Int? = nil          // this service's last endpoint is removed
        var renamed: Int? = nil          // this service's first port is renamed (another chain)
        var ranges: [String] = ["198.51.100.0/28"]
        var affinity: Int? = nil         // this service gets ClientIP affinity
        var unnamedPort = 7000           // the external port of each service's unnamed port (in its comment)
    }

    static func plan(_ shape: Shape, masquerade: Bool = true) throws -> RulePlan {
        var objects = ClusterObjects()
        for i in 0..<shape.services {
            let id = ObjectName(namespace: "upd", name: "svc\(i)")
            let ports = [ServicePort(name: shape.renamed == i ? "renamed" : "web", protocol: .tcp, port: 80, targetPort: "8080"),
                         ServicePort(name: "", protocol: .udp, port: shape.unnamedPort, targetPort: "5353")]
            objects.services.append(Service(
                id: id, type: "LoadBalancer", ipFamilies: [.ipv4, .ipv6], ports: ports,
                loadBalancerIngress: [LoadBalancerIngress(ip: IPAddress("203.0.113.\(i + 1)")),
                                      LoadBalancerIngress(ip: IPAddress("2001:db8:100::\(i + 1)"))],
                sessionAffinity: shape.affinity == i ? "ClientIP" : nil, sessionAffinityTimeoutSeconds: shape.affinity == i ? 600 : nil,
                loadBalancerSourceRanges: i % 2 == 0 ? shape.ranges : []))
            for (family, base) in [(IPFamily.ipv4, "198.51.100."), (.ipv6, "2001:db8:200::")] {
                var eps = (0..<shape.endpoints).map { "\(base)\(10 * i + $0 + 1)" }
                if shape.moved == i { eps[0] = "\(base)\(200 + i)" }
                if shape.dropped == i { eps.removeLast() }
                objects.endpointSlices.append(EndpointSlice(
                    id: ObjectName(namespace: "upd", name: "svc\(i)-\(family.rawValue)"), serviceName: "svc\(i)",
                    addressType: family.rawValue,
                    ports: [EndpointPort(name: shape.renamed == i ? "renamed" : "web", port: 8080, protocol: .tcp),
                            EndpointPort(name: "", port: 5353, protocol: .udp)],
                    endpoints: eps.map { Endpoint(addresses: [IPAddress($0)!]) }))
            }
        }
        let resolution = ServiceResolver(options: ResolutionOptions(target: .endpoints)).resolve(objects)
        return try Planner(settings: PlanSettings(masquerade: masquerade)).plan(resolution, strategy: .endpoints)
    }

    static let shapes: [(String, Shape)] = [
        ("same", Shape()),
        ("endpoint moved", Shape(moved: 2)),
        ("endpoint dropped", Shape(dropped: 4)),
        ("service added", Shape(services: 7)),
        ("service removed", Shape(services: 5)),
        ("port renamed", Shape(renamed: 1)),
        ("source ranges changed", Shape(ranges: ["198.51.100.0/28", "192.0.2.0/24"])),
        ("affinity on", Shape(affinity: 3)),
        ("unnamed port's number changed", Shape(unnamedPort: 7001)),
        ("one endpoint each", Shape(endpoints: 1)),
    ]

    /// `plan` with its target chains in reverse order (the rules pointing at the same chains).
    static func reversedChains(_ plan: RulePlan) -> RulePlan {
        let n = plan.targetChains.count
        return RulePlan(settings: plan.settings, strategy: plan.strategy,
                        rules: plan.rules.map { PlannedRule(mapping: $0.mapping, targetIndex: n - 1 - $0.targetIndex) },
                        targetChains: plan.targetChains.reversed(), skipped: plan.skipped, conflicts: plan.conflicts,
                        warnings: plan.warnings)
    }

    @Test func chainsOutOfOrderArePairedByName() throws {
        // The planners sort chains, and chainUpdate pairs them by walking both lists; a list out of that order
        // makes it pair them by name instead, with the same outcome (chains listed in the other order).
        let backend = IptablesBackend(context: NodeContext(), variant: .legacy, variantReason: "test")
        var fellBack = 0, changed = 0
        for (_, oldShape) in Self.shapes {
            for (newName, newShape) in Self.shapes {
                let old = try Self.plan(oldShape), new = try Self.plan(newShape)
                let shuffled = Self.reversedChains(new), oldShuffled = Self.reversedChains(old)
                for family in IPFamily.allCases {
                    let inOrder = backend.chainUpdate(family: family, from: old, to: new)
                    let byName = backend.chainUpdate(family: family, from: old, to: shuffled)
                    #expect(byName.written.sorted() == inOrder.written.sorted(), "\(newName) \(family)")
                    #expect(byName.deleted == inOrder.deleted, "\(newName) \(family)")
                    #expect(byName.differences.sorted() == inOrder.differences.sorted(), "\(newName) \(family)")
                    // `old` out of order: everything, the script included, comes out as from the sorted one
                    // (stale chains in `old`'s order, which is reversed too).
                    let oldByName = backend.chainUpdate(family: family, from: oldShuffled, to: new)
                    #expect(oldByName.written == inOrder.written, "\(newName) \(family)")
                    #expect(oldByName.deleted.sorted() == inOrder.deleted.sorted(), "\(newName) \(family)")
                    #expect(oldByName.differences.sorted() == inOrder.differences.sorted(), "\(newName) \(family)")
                    if inOrder.deleted.count < 2 { #expect(oldByName.script == inOrder.script, "\(newName) \(family)") }
                    if !inOrder.written.isEmpty { changed += 1 }
                    for (o, n) in [(old, shuffled), (oldShuffled, new)] {
                        let walked = o.targetChains.withUnsafeBufferPointer { oc in
                            n.targetChains.withUnsafeBufferPointer { nc in
                                IptablesBackend.pairChainsInOrder(family, oc, nc, pair: { _, _ in }, unmatched: { _ in })
                            }
                        }
                        if !walked { fellBack += 1 }
                    }
                }
            }
        }
        #expect(fellBack == 400 && changed > 50)
    }

    @Test func chainsCompareInPlaceAsEqualityDoes() throws {
        // `TargetChain.same` lists the fields by hand: a field added to TargetChain must be added there too.
        // Same names with another target, affinity or comment (the unnamed port's number is in its comment).
        let chains = try Self.plan(Shape(affinity: 1)).targetChains + Self.plan(Shape(moved: 2, renamed: 3)).targetChains
            + Self.plan(Shape(unnamedPort: 7001)).targetChains
        #expect(Mirror(reflecting: chains[0]).children.count == 8)
        var equal = 0
        chains.withUnsafeBufferPointer { c in
            for i in c.indices {
                for j in c.indices {
                    #expect(TargetChain.same(c, i, c, j) == (chains[i] == chains[j]))
                    if chains[i] == chains[j] && i != j { equal += 1 }
                }
            }
        }
        #expect(equal > 0)
    }

    @Test(arguments: [true, false])
    func theFastPathWritesWhatTheFullComparisonWrites(masquerade: Bool) throws {
        let backend = IptablesBackend(context: NodeContext(), variant: .legacy, variantReason: "test")
        var checked = 0, changed = 0
        for (oldName, oldShape) in Self.shapes {
            for (newName, newShape) in Self.shapes {
                let old = try Self.plan(oldShape, masquerade: masquerade), new = try Self.plan(newShape, masquerade: masquerade)
                for family in IPFamily.allCases {
                    let s = new.settings
                    let installed = IptablesOwned(family: family, installed: IptablesDesired(plan: old, family: family),
                                                  hooks: IptablesOwned(family: family, jumpsInPlace: s))
                    let desired = IptablesDesired(plan: new, family: family)
                    let full = backend.differences(desired, installed, s)
                    let fast = backend.chainUpdate(family: family, from: old, to: new)
                    let label = "\(oldName) → \(newName), \(family)"
                    #expect(fast.differences == full, "\(label)")
                    #expect(fast.mappings == desired.mappings, "\(label)")
                    if full.isEmpty {
                        #expect(fast.script.isEmpty && fast.written.isEmpty && fast.deleted.isEmpty, "\(label)")
                    } else {
                        let r = backend.restoreScript(desired, installed, s)
                        #expect(fast.script == r.script, "\(label)")
                        #expect(fast.written == r.written && fast.deleted == r.deleted, "\(label)")
                        changed += 1
                    }
                    checked += 1
                }
            }
        }
        #expect(checked == 200 && changed > 100)
    }
}
