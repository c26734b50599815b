import KubeObjects
import NetAddress
import RulePlanning
import ServiceResolution
@testable import RulePlanning
import Testing

/// The agent's planner must give exactly what a one-shot plan of the same objects gives, after any sequence
/// of changes: two independent paths, compared after every step.
@Suite struct IncrementalPlannerTests {
    /// A small deterministic generator (no Foundation randomness, so a failure replays).
    struct Generator {
        var state: UInt64
        mutating func next(_ n: Int) -> Int {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Int((state >> 33) % UInt64(n))
        }
    }

    static func service(_ g: inout Generator, _ i: Int) -> Service {
        // Few external addresses and ports, so conflicts come and go.
        let lb = IPAddress("203.0.113.\(1 + g.next(4))")!
        let ports = (0..<(1 + g.next(2))).map { j in
            ServicePort(name: "p\(j)", protocol: g.next(3) == 0 ? .udp : .tcp, port: 80 + g.next(3))
        }
        let ns = ["a", "b"][i % 2]
        return Service(id: ObjectName(namespace: ns, name: "s\(i)"), type: "LoadBalancer",
                       clusterIPs: [IPAddress("192.0.2.\(10 + i)")!], ports: ports,
                       loadBalancerIngress: g.next(5) == 0 ? [] : [LoadBalancerIngress(ip: lb)],
                       sessionAffinity: g.next(4) == 0 ? "ClientIP" : nil,
                       sessionAffinityTimeoutSeconds: g.next(2) == 0 ? nil : 1 + g.next(3),
                       loadBalancerSourceRanges: g.next(3) == 0 ? ["198.51.100.0/\(24 + g.next(3))", " 2001:db8::/32"] : [],
                       loadBalancerSourceRangesAnnotation: g.next(4) == 0 ? "192.0.2.0/24,bad" : nil)
    }

    static func slice(_ g: inout Generator, service i: Int, k: Int) -> EndpointSlice {
        let ns = ["a", "b"][i % 2]
        let endpoints = (0..<g.next(4)).map { e in
            Endpoint(addresses: [IPAddress("198.51.100.\(1 + g.next(40))")!], ready: e == 0 ? nil : g.next(3) != 0,
                     serving: true, terminating: g.next(2) == 0)
        }
        return EndpointSlice(id: ObjectName(namespace: ns, name: "s\(i)-\(k)"), serviceName: "s\(i)", addressType: "IPv4",
                             ports: [EndpointPort(name: "p0", port: 8080, protocol: .tcp), EndpointPort(name: "p1", port: 8081, protocol: .udp),
                                     EndpointPort(name: "p0", port: 8080, protocol: .udp)],
                             endpoints: endpoints)
    }

    /// The agent keeps endpoints in their slots (`keepingSlots`), so only the order of destinations may differ.
    static func sortedDestinations(_ t: MappingTarget) -> MappingTarget {
        if case .endpoints(let d) = t { return .endpoints(d.sorted()) }
        return t
    }

    static func normalized(_ p: RulePlan) -> ([PlannedRule], [TargetChain]) {
        (p.rules.map { r in
            let m = r.mapping
            return PlannedRule(mapping: m.replacingTarget(sortedDestinations(m.target)), targetIndex: r.targetIndex)
        }, p.targetChains.map { c in
            TargetChain(service: c.service, portName: c.portName, family: c.family, protocol: c.protocol,
                        iptablesName: c.iptablesName, comment: c.comment, target: sortedDestinations(c.target),
                        affinityTimeout: c.affinityTimeout)
        })
    }

    static func expectSame(_ a: RulePlan, _ b: RulePlan, step: Int) {
        let (ar, ac) = normalized(a), (br, bc) = normalized(b)
        #expect(ar == br, "step \(step): rules differ")
        #expect(ac == bc, "step \(step): target chains differ")
        // Every mapping of one chain carries the chain's destinations in the same order (one slot layout).
        for r in a.rules { #expect(r.mapping.target == a.targetChains[r.targetIndex].target, "step \(step)") }
        #expect(a.skipped == b.skipped, "step \(step): skipped differ")
        #expect(a.conflicts == b.conflicts, "step \(step): conflicts differ")
        #expect(a.warnings == b.warnings, "step \(step): warnings differ")
    }

    @Test(arguments: [1, 2, 3, 4])
    func matchesAFullPlanAfterEveryChange(seed: UInt64) {
        var g = Generator(state: seed)
        let settings = PlanSettings(onConflict: .skip)
        for target in [TargetStrategy.auto, .endpoints, .clusterIP] {
            let options = ResolutionOptions(target: target)
            var store = ObjectStore()
            var incremental = IncrementalPlanner(settings: settings, options: options)
            for step in 0..<150 {
                let i = g.next(12)
                let change: ObjectChange
                switch g.next(5) {
                case 0, 1: change = .service(Self.service(&g, i))
                case 2: change = .serviceDeleted(ObjectName(namespace: ["a", "b"][i % 2], name: "s\(i)"))
                case 3: change = .endpointSlice(Self.slice(&g, service: i, k: g.next(2)))
                default: change = .endpointSliceDeleted(ObjectName(namespace: ["a", "b"][i % 2], name: "s\(i)-\(g.next(2))"))
                }
                for name in store.apply(change) {
                    incremental.update(name, service: store.services[name], slices: store.slices(of: name))
                }
                let full = try! Planner(settings: settings).plan(ServiceResolver(options: options).resolve(store.objects), strategy: target)
                Self.expectSame(incremental.plan(), full, step: step)
            }
        }
    }

    @Test func aConflictEndsWhenOneSideGoesAway() {
        let options = ResolutionOptions(target: .clusterIP)
        var p = IncrementalPlanner(settings: PlanSettings(), options: options)
        let a = Service(id: ObjectName(namespace: "x", name: "a"), clusterIPs: [IPAddress("192.0.2.1")!],
                        ports: [ServicePort(port: 443)], loadBalancerIngress: [LoadBalancerIngress(ip: IPAddress("203.0.113.9"))])
        var b = a
        b.id = ObjectName(namespace: "x", name: "b")
        p.update(a.id, service: a, slices: [])
        p.update(b.id, service: b, slices: [])
        let both = p.plan()
        #expect(both.rules.isEmpty)
        #expect(both.conflicts.map(\.services) == [["x/a", "x/b"]])
        #expect(both.skipped.filter { $0.code == .conflict }.count == 2)
        p.update(b.id, service: nil, slices: [])
        let one = p.plan()
        #expect(one.conflicts.isEmpty)
        #expect(one.rules.map(\.mapping.service) == [a.id])
        // Nothing changed: update says so, so a sync can skip the service.
        #expect(p.update(a.id, service: a, slices: []) == false)
    }
}

@Suite struct SlotStabilityTests {
    static func d(_ last: Int) -> Destination { Destination(ip: IPAddress("198.51.100.\(last)")!, port: 8080) }

    @Test func endpointsKeepTheirSlots() {
        let old = [1, 2, 3, 4].map(Self.d)
        // One replaced: only its slot changes.
        #expect(IncrementalPlanner.arrange([1, 3, 4, 9].map(Self.d), after: old) == [1, 9, 3, 4].map(Self.d))
        // One removed: the last moves into the hole; everything else stays.
        #expect(IncrementalPlanner.arrange([1, 3, 4].map(Self.d), after: old) == [1, 4, 3].map(Self.d))
        // One added: appended.
        #expect(IncrementalPlanner.arrange([1, 2, 3, 4, 5].map(Self.d), after: old) == [1, 2, 3, 4, 5].map(Self.d))
        // Two removed, one added.
        #expect(IncrementalPlanner.arrange([2, 4, 7].map(Self.d), after: old) == [7, 2, 4].map(Self.d))
        // All gone.
        #expect(IncrementalPlanner.arrange([], after: old).isEmpty)
        #expect(IncrementalPlanner.arrange([5, 6].map(Self.d), after: []) == [5, 6].map(Self.d))
    }

    @Test func oneEndpointLessMovesAtMostTwoSlots() {
        var p = IncrementalPlanner(settings: PlanSettings(), options: ResolutionOptions(target: .endpoints))
        let svc = Service(id: ObjectName(namespace: "x", name: "web"), clusterIPs: [IPAddress("192.0.2.1")!],
                          ports: [ServicePort(name: "http", port: 80)], loadBalancerIngress: [LoadBalancerIngress(ip: IPAddress("203.0.113.9"))])
        func slice(_ ips: [Int]) -> EndpointSlice {
            EndpointSlice(id: ObjectName(namespace: "x", name: "web-1"), serviceName: "web", addressType: "IPv4",
                          ports: [EndpointPort(name: "http", port: 8080)], endpoints: ips.map { Endpoint(addresses: [IPAddress("198.51.100.\($0)")!]) })
        }
        p.update(svc.id, service: svc, slices: [slice(Array(1...30))])
        let before = p.plan().rules[0].mapping.target.destinations
        p.update(svc.id, service: svc, slices: [slice(Array(1...30).filter { $0 != 2 })])
        let after = p.plan().rules[0].mapping.target.destinations
        #expect(after.count == 29)
        let moved = zip(before, after).filter { $0 != $1 }.count
        #expect(moved == 1, "slot 1 takes the last endpoint; nothing else moves: \(moved)")
        #expect(Set(after) == Set(before).subtracting([Self.d(2)]))
    }
}
