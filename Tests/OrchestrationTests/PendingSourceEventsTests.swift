import Foundation
import KubeObjects
import KubernetesAPI
import NetAddress
@testable import Orchestration
import Testing

/// The coalescing buffer between the watch and the agent's loop: bounded by the objects, never losing the
/// latest state of any of them, and keeping the order the loop's bookkeeping needs.
@Suite struct PendingSourceEventsTests {
    typealias F = AgentFixtures
    let t0 = Date(timeIntervalSince1970: 1_000)

    func describe(_ events: [(event: SourceEvent, seen: Date, occurrences: Int)]) -> [String] {
        events.map { e in
            switch e.event {
            case .listed(let k, let o, _, _): return "listed \(k.rawValue) \(o.services.count + o.endpointSlices.count)"
            case .changed(.service(let s)): return "service \(s.id) \(s.loadBalancerIngress.first?.ip?.description ?? "")"
            case .changed(.serviceDeleted(let n)): return "deleted service \(n)"
            case .changed(.endpointSlice(let s)): return "slice \(s.id) \(s.endpoints.first?.addresses.first?.description ?? "")"
            case .changed(.endpointSliceDeleted(let n)): return "deleted slice \(n)"
            case .invalidObject(let k, let n, _): return "invalid \(k.rawValue) \(n?.description ?? "?")"
            case .connected(let k): return "connected \(k.rawValue)"
            case .unavailable(let k, _, _): return "unavailable \(k.rawValue)"
            case .watchRestarted(let k, let r): return "restarted \(k.rawValue) \(r.rawValue)"
            }
        }
    }

    @Test func aNewerChangeOfAnObjectReplacesTheOlderAndMovesLast() {
        let p = PendingSourceEvents()
        #expect(p.add(.changed(.endpointSlice(F.slice("web", ["198.51.100.5"]))), seen: t0))  // wakes
        #expect(!p.add(.invalidObject(.endpointSlices, ObjectName(namespace: "shop", name: "web-1"), message: "bad"), seen: t0))
        #expect(!p.add(.changed(.service(F.service("api", lb: "203.0.113.11"))), seen: t0))
        #expect(!p.add(.changed(.endpointSlice(F.slice("web", ["198.51.100.6"]))), seen: t0 + 5))
        let out = p.drain()
        #expect(describe(out) == ["invalid endpointslices shop/web-1", "service shop/api 203.0.113.11", "slice shop/web-1 198.51.100.6"])
        // The change has waited since the first of the two events.
        #expect(out.last?.seen == t0)
        #expect(p.count == 0)
        #expect(p.add(.changed(.serviceDeleted(ObjectName(namespace: "shop", name: "api"))), seen: t0))  // empty again: wakes
    }

    @Test func aListReplacesThePendingChangesAndReportsOfItsKindOnly() {
        let p = PendingSourceEvents()
        _ = p.add(.changed(.service(F.service("api", lb: "203.0.113.11"))), seen: t0)
        _ = p.add(.changed(.endpointSlice(F.slice("web", ["198.51.100.5"]))), seen: t0)
        _ = p.add(.invalidObject(.services, ObjectName(namespace: "shop", name: "bad"), message: "x"), seen: t0)
        _ = p.add(F.listed([F.service("web", lb: "203.0.113.10")], [])[0], seen: t0)  // the services list
        _ = p.add(.changed(.service(F.service("api", lb: "203.0.113.12"))), seen: t0)
        // The list says what is undecodable now: the older report of its kind goes too.
        #expect(describe(p.drain()) == ["slice shop/web-1 198.51.100.5", "listed services 1", "service shop/api 203.0.113.12"])
    }

    @Test func anOutageThatEndedIsStillSeen() {
        let p = PendingSourceEvents()
        let down = SourceEvent.unavailable(.services, KubernetesAPIError(.unavailable, "refused"), retryIn: .seconds(1))
        _ = p.add(down, seen: t0)
        _ = p.add(.connected(.services), seen: t0)
        _ = p.add(down, seen: t0)
        _ = p.add(.connected(.services), seen: t0)
        #expect(describe(p.drain()) == ["unavailable services", "connected services"])
        _ = p.add(.connected(.services), seen: t0)
        _ = p.add(down, seen: t0)
        #expect(describe(p.drain()) == ["connected services", "unavailable services"])
    }

    @Test func whatWaitsIsBoundedByTheObjectsNotTheEvents() {
        let p = PendingSourceEvents()
        for round in 0..<200 {
            for i in 0..<50 {
                _ = p.add(.changed(.endpointSlice(F.slice("web\(i)", ["198.51.100.\(round % 250)"]))), seen: t0)
            }
            _ = p.add(.watchRestarted(.services, .timeout), seen: t0)
        }
        #expect(p.count == 51)
        let out = p.drain()
        #expect(out.count == 51)
        // Each entry knows how many events it stands for: the restarts are still counted one by one.
        #expect(out.map(\.occurrences).reduce(0, +) == 200 * 51)
        #expect(out.last?.occurrences == 200)
        #expect(describe(out).filter { $0.hasSuffix("198.51.100.199") }.count == 50)
    }
}
