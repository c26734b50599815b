import KubeObjects
import NetAddress
import RulePlanning
import ServiceResolution
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

    static func expectSame(_ a: RulePlan, _ b: RulePlan, step: Int) {
        #expect(a.rules == b.rules, "step \(step): rules differ")
        #expect(a.targetChains == b.targetChains, "step \(step): target chains differ")
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
