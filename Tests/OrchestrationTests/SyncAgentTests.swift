import Foundation
import KubeObjects
import KubernetesAPI
import Logging
import NetAddress
import NodeBackend
import Orchestration
import RulePlanning
import ServiceLifecycle
import ServiceResolution
import Synchronization
import Testing

/// An installer that records what the agent asks of the kernel, and fails when told to.
final class RecordingInstaller: RuleInstaller, @unchecked Sendable {
    enum Call: Equatable, CustomStringConvertible {
        case replace(rules: Int), update(from: Int, to: Int), remove, conntrack
        var description: String {
            switch self {
            case .replace(let n): return "replace(\(n))"
            case .update(let a, let b): return "update(\(a)→\(b))"
            case .remove: return "remove"
            case .conntrack: return "conntrack"
            }
        }
    }
    struct State {
        var calls: [Call] = []
        var plans: [RulePlan] = []
        var failReplaces = 0
        var failUpdates = 0
        var detected: TargetStrategy = .endpoints
        var detections = 0
    }
    let state = Mutex(State())
    /// While set, `update` waits for it: a sync that takes its time.
    let updateGate = Mutex<DispatchSemaphore?>(nil)

    var calls: [Call] { state.withLock { $0.calls.filter { $0 != .conntrack } } }
    var lastPlan: RulePlan? { state.withLock { $0.plans.last } }

    func replace(with plan: RulePlan) throws(NodeError) -> InstallOutcome {
        let fail = state.withLock { s -> Bool in
            s.calls.append(.replace(rules: plan.rules.count))
            if s.failReplaces > 0 { s.failReplaces -= 1; return true }
            s.plans.append(plan)
            return false
        }
        if fail { throw NodeError(exitCode: 1, description: "the kernel refused (test)") }
        return InstallOutcome(changed: true, added: plan.rules.count, incremental: false, summary: "replaced")
    }

    func update(from old: RulePlan, to new: RulePlan) throws(NodeError) -> InstallOutcome {
        state.withLock { $0.calls.append(.update(from: old.rules.count, to: new.rules.count)) }
        if let gate = updateGate.withLock({ $0 }) { gate.wait() }
        let fail = state.withLock { s -> Bool in
            if s.failUpdates > 0 { s.failUpdates -= 1; return true }
            s.plans.append(new)
            return false
        }
        if fail { throw NodeError(exitCode: 1, description: "No such file or directory (test)") }
        return InstallOutcome(changed: true, added: 1, removed: 1, incremental: true, summary: "updated")
    }

    func remove(_ settings: PlanSettings) throws(NodeError) -> Bool {
        state.withLock { $0.calls.append(.remove) }
        return true
    }

    func cleanConntrack(from old: RulePlan?, to new: RulePlan) throws(NodeError) -> Int {
        state.withLock { $0.calls.append(.conntrack) }
        return 0
    }

    func detectTarget(haveEndpointSlices: Bool) throws(NodeError) -> (TargetStrategy, String) {
        state.withLock { s in
            s.detections += 1
            return (s.detected, "test detection")
        }
    }
}

final class RecordingObserver: SyncObserver, @unchecked Sendable {
    let reports = Mutex<[SyncReport]>([])
    let failures = Mutex<[String]>([])
    func syncSucceeded(_ report: SyncReport) { reports.withLock { $0.append(report) } }
    func syncFailed(kind: SyncReport.Kind, reason: String, message: String) { failures.withLock { $0.append(reason) } }
    func sourceEvent(_ event: SourceEvent) {}
}

/// A running agent fed by the test.
struct AgentHarness {
    let installer = RecordingInstaller()
    let observer = RecordingObserver()
    let events: AsyncStream<SourceEvent>.Continuation
    let task: Task<Void, any Error>

    init(target: TargetStrategy = .endpoints, minSyncPeriod: Duration = .zero, syncPeriod: Duration = .seconds(300),
         cleanupOnExit: Bool = false) {
        let (stream, continuation) = AsyncStream<SourceEvent>.makeStream()
        events = continuation
        let configuration = SyncConfiguration(options: ResolutionOptions(target: target), settings: PlanSettings(),
                                              minSyncPeriod: minSyncPeriod, syncPeriod: syncPeriod,
                                              cleanupOnExit: cleanupOnExit, maxRetryDelay: .milliseconds(200))
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let agent = SyncAgent(configuration: configuration, source: { stream }, installer: installer,
                              observer: observer, logger: logger)
        task = Task { try await agent.run() }
    }

    func send(_ e: SourceEvent) { events.yield(e) }

    /// Makes the installer's next updates wait (a sync that takes its time) until `releaseUpdates`, or 10 s.
    func holdUpdates() -> DispatchSemaphore {
        let gate = DispatchSemaphore(value: 0)
        installer.updateGate.withLock { $0 = gate }
        let installer = self.installer
        DispatchQueue.global().asyncAfter(deadline: .now() + 10) {
            installer.updateGate.withLock { $0 = nil }
            gate.signal()
        }
        return gate
    }

    func releaseUpdates(_ gate: DispatchSemaphore) {
        installer.updateGate.withLock { $0 = nil }
        gate.signal()
    }

    /// Polls until `condition` holds (at most `timeout`); the caller then asserts on it.
    @discardableResult
    func waitFor(_ timeout: Duration = .seconds(5), _ condition: () -> Bool) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if condition() { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return condition()
    }

    func stop() async {
        events.finish()
        _ = try? await task.value
    }
}

enum AgentFixtures {
    static func ip(_ s: String) -> IPAddress { IPAddress(s)! }

    static func service(_ name: String, lb: String, port: Int = 443) -> KubeObjects.Service {
        Service(id: ObjectName(namespace: "shop", name: name), type: "LoadBalancer", clusterIPs: [ip("192.0.2.10")],
                ports: [ServicePort(name: "https", protocol: .tcp, port: port)], loadBalancerIngress: [LoadBalancerIngress(ip: ip(lb))])
    }

    static func slice(_ service: String, _ addresses: [String], name: String? = nil) -> EndpointSlice {
        EndpointSlice(id: ObjectName(namespace: "shop", name: name ?? "\(service)-1"), serviceName: service, addressType: "IPv4",
                      ports: [EndpointPort(name: "https", port: 8443)], endpoints: addresses.map { Endpoint(addresses: [ip($0)]) })
    }

    static func listed(_ services: [KubeObjects.Service], _ slices: [EndpointSlice]) -> [SourceEvent] {
        var s = ClusterObjects(); s.services = services
        var e = ClusterObjects(); e.endpointSlices = slices
        return [.listed(.services, s, resourceVersion: "1"), .listed(.endpointSlices, e, resourceVersion: "1")]
    }
}

@Suite struct SyncAgentTests {
    typealias F = AgentFixtures

    @Test func nothingReachesTheKernelUntilBothKindsAreListed() async {
        let h = AgentHarness()
        var s = ClusterObjects(); s.services = [F.service("web", lb: "203.0.113.10")]
        h.send(.listed(.services, s, resourceVersion: "1"))
        h.send(.unavailable(.endpointSlices, KubernetesAPIError(.unavailable, "connection refused"), retryIn: .seconds(1)))
        h.send(.changed(.service(F.service("api", lb: "203.0.113.11"))))
        try? await Task.sleep(for: .milliseconds(300))
        #expect(h.installer.calls.isEmpty, "\(h.installer.calls)")
        var e = ClusterObjects(); e.endpointSlices = [F.slice("web", ["198.51.100.5"])]
        h.send(.listed(.endpointSlices, e, resourceVersion: "2"))
        #expect(await h.waitFor { h.installer.calls == [.replace(rules: 1)] }, "\(h.installer.calls)")
        await h.stop()
    }

    @Test func theFirstSyncIsFullThenOnlyDifferencesAreSent() async throws {
        let h = AgentHarness()
        for e in F.listed([F.service("web", lb: "203.0.113.10")], [F.slice("web", ["198.51.100.5", "198.51.100.6"])]) { h.send(e) }
        #expect(await h.waitFor { h.installer.calls.count == 1 })
        h.send(.changed(.endpointSlice(F.slice("web", ["198.51.100.5"]))))
        #expect(await h.waitFor { h.installer.calls.count == 2 })
        #expect(h.installer.calls == [.replace(rules: 1), .update(from: 1, to: 1)])
        let plan = try #require(h.installer.lastPlan)
        #expect(plan.rules.first?.mapping.target.destinations.map(\.ip.description) == ["198.51.100.5"])
        // A change that does not change the plan sends nothing.
        h.send(.changed(.endpointSlice(F.slice("other", ["198.51.100.9"], name: "unrelated"))))
        h.send(.changed(.service(F.service("api", lb: "203.0.113.11"))))  // no slices: skipped, no rule
        try? await Task.sleep(for: .milliseconds(300))
        #expect(h.installer.calls.count == 2, "\(h.installer.calls)")
        // (Both changes may go in one sync or two.)
        #expect(await h.waitFor { h.observer.reports.withLock { $0.last?.skippedByReason[.noEndpointSlicesOfFamily] } == 1 })
        let last = try #require(h.observer.reports.withLock { $0.last })
        #expect(last.mappingsByFamily["IPv4"] == 1)
        await h.stop()
    }

    @Test func changesWithinTheMinimumPeriodAreCoalesced() async {
        let h = AgentHarness(minSyncPeriod: .milliseconds(700))
        for e in F.listed([F.service("web", lb: "203.0.113.10")], [F.slice("web", ["198.51.100.5"])]) { h.send(e) }
        #expect(await h.waitFor { h.installer.calls.count == 1 })
        for i in 1...20 { h.send(.changed(.endpointSlice(F.slice("web", ["198.51.100.\(5 + i)"])))) }
        #expect(await h.waitFor { h.installer.lastPlan?.rules.first?.mapping.target.destinations.first?.ip.description == "198.51.100.25" })
        try? await Task.sleep(for: .milliseconds(900))
        // One transaction for the burst (the first change may go alone if the period had already passed).
        #expect(h.installer.calls.count <= 3, "\(h.installer.calls)")
        await h.stop()
    }

    @Test func aRefusedUpdateFallsBackToAFullReplace() async {
        let h = AgentHarness()
        for e in F.listed([F.service("web", lb: "203.0.113.10")], [F.slice("web", ["198.51.100.5"])]) { h.send(e) }
        #expect(await h.waitFor { h.installer.calls.count == 1 })
        h.installer.state.withLock { $0.failUpdates = 1 }
        h.send(.changed(.endpointSlice(F.slice("web", ["198.51.100.6"]))))
        #expect(await h.waitFor { h.installer.calls.count == 3 })
        #expect(h.installer.calls == [.replace(rules: 1), .update(from: 1, to: 1), .replace(rules: 1)])
        #expect(h.observer.reports.withLock { $0.last?.fellBackToFull } == true)
        await h.stop()
    }

    @Test func aFailedSyncIsRetriedWithBackoffAndTheNextOneIsFull() async {
        let h = AgentHarness()
        h.installer.state.withLock { $0.failReplaces = 2 }
        for e in F.listed([F.service("web", lb: "203.0.113.10")], [F.slice("web", ["198.51.100.5"])]) { h.send(e) }
        #expect(await h.waitFor { h.installer.lastPlan != nil })
        #expect(h.installer.calls == [.replace(rules: 1), .replace(rules: 1), .replace(rules: 1)])
        #expect(h.observer.failures.withLock { $0 } == ["kernel", "kernel"])
        await h.stop()
    }

    @Test func aKernelThatKeepsRefusingIsRetriedWithBackoffEvenPastTheSyncPeriod() async {
        let h = AgentHarness(syncPeriod: .milliseconds(100))
        for e in F.listed([F.service("web", lb: "203.0.113.10")], [F.slice("web", ["198.51.100.5"])]) { h.send(e) }
        #expect(await h.waitFor { h.installer.calls.count == 1 })
        h.installer.state.withLock { $0.failReplaces = 1_000_000 }
        // Past the sync period, every full sync fails; retries wait 100 ms, then 200 ms (the harness's cap).
        try? await Task.sleep(for: .seconds(1.2))
        let attempts = h.installer.calls.count
        #expect(attempts >= 4 && attempts <= 16, "\(attempts) attempts in 1.2 s")
        await h.stop()
    }

    @Test func oneUndecodableObjectNeverStopsTheOthers() async throws {
        let h = AgentHarness()
        for e in F.listed([F.service("web", lb: "203.0.113.10")], [F.slice("web", ["198.51.100.5"])]) { h.send(e) }
        #expect(await h.waitFor { h.installer.calls.count == 1 })
        h.send(.invalidObject(.services, ObjectName(namespace: "shop", name: "web"), message: "spec.ports[0].port: 70000 is out of range"))
        h.send(.changed(.service(F.service("api", lb: "203.0.113.11"))))
        h.send(.changed(.endpointSlice(F.slice("api", ["198.51.100.7"]))))
        #expect(await h.waitFor { h.installer.lastPlan?.rules.count == 2 })
        let plan = try #require(h.installer.lastPlan)
        // The bad write left web's last good copy in place.
        #expect(Set(plan.rules.map(\.mapping.service.name)) == ["web", "api"])
        #expect(plan.warnings.contains { $0.code == .invalidObject && $0.message.contains("shop/web") })
        #expect(h.observer.reports.withLock { $0.last?.skippedByReason[.invalidObject] } == 1)
        await h.stop()
    }

    /// A list says which of its items are undecodable (the watch also reports each before its `.listed`):
    /// they must stay reported, and an item fixed by a later list must drop out.
    @Test func undecodableItemsOfAListStayReportedUntilAListWithoutThem() async throws {
        let h = AgentHarness()
        let broken = ObjectName(namespace: "shop", name: "broken")
        let report = InvalidObject(name: broken, message: "spec: expected an object, got a number")
        h.send(.invalidObject(.services, broken, message: report.message))
        var s = ClusterObjects(); s.services = [F.service("web", lb: "203.0.113.10")]
        var e = ClusterObjects(); e.endpointSlices = [F.slice("web", ["198.51.100.5"])]
        h.send(.listed(.services, s, resourceVersion: "1", invalid: [report]))
        h.send(.listed(.endpointSlices, e, resourceVersion: "1"))
        #expect(await h.waitFor { h.observer.reports.withLock { $0.count } >= 1 })
        #expect(h.observer.reports.withLock { $0.last?.skippedByReason[.invalidObject] } == 1)
        #expect(h.installer.lastPlan?.warnings.contains { $0.code == .invalidObject && $0.message.contains("shop/broken") } == true)
        // The next list of Services has it decodable again.
        var fixed = ClusterObjects(); fixed.services = [F.service("web", lb: "203.0.113.10")]
        h.send(.listed(.services, fixed, resourceVersion: "9"))
        #expect(await h.waitFor { h.observer.reports.withLock { $0.last?.skippedByReason[.invalidObject] } == 0 })
        await h.stop()
    }

    @Test func aPeriodicFullSyncRepairsEvenWithoutChanges() async {
        let h = AgentHarness(syncPeriod: .milliseconds(300))
        for e in F.listed([F.service("web", lb: "203.0.113.10")], [F.slice("web", ["198.51.100.5"])]) { h.send(e) }
        #expect(await h.waitFor { h.installer.calls.count >= 3 })
        #expect(h.installer.calls.prefix(3).allSatisfy { if case .replace = $0 { return true } else { return false } },
                "\(h.installer.calls)")
        await h.stop()
    }

    @Test func autoIsDecidedAtTheFirstSyncAndFollowedAtFullSyncs() async throws {
        let h = AgentHarness(target: .auto, syncPeriod: .milliseconds(400))
        h.installer.state.withLock { $0.detected = .clusterIP }
        for e in F.listed([F.service("web", lb: "203.0.113.10")], [F.slice("web", ["198.51.100.5"])]) { h.send(e) }
        #expect(await h.waitFor { h.installer.lastPlan != nil })
        let first = try #require(h.installer.lastPlan)
        #expect(first.rules.first?.mapping.target.strategy == .clusterIP)
        h.installer.state.withLock { $0.detected = .endpoints }
        #expect(await h.waitFor { h.installer.lastPlan?.rules.first?.mapping.target.strategy == .endpoints })
        await h.stop()
    }

    @Test(arguments: [false, true])
    func gracefulShutdownLeavesOrRemovesTheRules(cleanup: Bool) async throws {
        let (stream, continuation) = AsyncStream<SourceEvent>.makeStream()
        let installer = RecordingInstaller()
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let agent = SyncAgent(configuration: SyncConfiguration(options: ResolutionOptions(target: .endpoints), settings: PlanSettings(),
                                                               minSyncPeriod: .zero, cleanupOnExit: cleanup),
                              source: { stream }, installer: installer, logger: logger)
        let group = ServiceGroup(configuration: .init(services: [.init(service: agent)], logger: logger))
        let running = Task { try await group.run() }
        for e in F.listed([F.service("web", lb: "203.0.113.10")], [F.slice("web", ["198.51.100.5"])]) { continuation.yield(e) }
        let deadline = ContinuousClock.now + .seconds(5)
        while installer.calls.isEmpty && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        await group.triggerGracefulShutdown()
        try await running.value
        #expect(installer.calls == (cleanup ? [.replace(rules: 1), .remove] : [.replace(rules: 1)]))
    }
}

/// Tests that hold the agent's kernel call (`AgentHarness.holdUpdates`), which blocks one of the concurrency
/// pool's threads: they run one at a time, and the hold lets go by itself after a while so that a machine
/// with a one-thread pool fails them instead of hanging.
@Suite(.serialized) struct SyncAgentHeldSyncTests {
    typealias F = AgentFixtures

    /// With `--min-sync-period 0s` every change may go at once, but what arrives while a sync runs waits for
    /// it and then goes in one sync (kube-proxy's runner does the same), however many events it was: a
    /// slow kernel (iptables-legacy takes seconds) must not be followed by one sync per queued event.
    @Test func eventsArrivingDuringASyncGoInTheNextOne() async {
        let h = AgentHarness(minSyncPeriod: .zero)
        for e in F.listed([F.service("web", lb: "203.0.113.10")], [F.slice("web", ["198.51.100.5"])]) { h.send(e) }
        #expect(await h.waitFor { h.installer.calls.count == 1 })
        let gate = h.holdUpdates()
        h.send(.changed(.endpointSlice(F.slice("web", ["198.51.100.6"]))))
        #expect(await h.waitFor { h.installer.calls.count == 2 })  // that update is now waiting at the gate
        for i in 1...40 {
            h.send(.changed(.endpointSlice(F.slice("web", ["198.51.100.\(6 + i)"]))))
            h.send(.changed(.service(F.service("api\(i)", lb: "203.0.113.\(100 + i)"))))
        }
        try? await Task.sleep(for: .milliseconds(300))
        h.releaseUpdates(gate)
        #expect(await h.waitFor { h.installer.lastPlan?.rules.first?.mapping.target.destinations.first?.ip.description == "198.51.100.46" })
        try? await Task.sleep(for: .milliseconds(300))
        // The replace, the gated update, then one update for all 80 events (two if the feeder was
        // still moving events when the loop woke); one per event was 80.
        #expect(h.installer.calls.count <= 4, "\(h.installer.calls)")
        await h.stop()
    }

    /// While a sync runs: an object is reported undecodable, then fixed, then a relist shows it fine. The
    /// fix's own event is coalesced into the list; the object must not stay counted as undecodable.
    @Test func aRelistDuringASyncClearsAnObjectFixedMeanwhile() async throws {
        let h = AgentHarness(minSyncPeriod: .zero)
        for e in F.listed([F.service("web", lb: "203.0.113.10")], [F.slice("web", ["198.51.100.5"])]) { h.send(e) }
        #expect(await h.waitFor { h.installer.calls.count == 1 })
        let gate = h.holdUpdates()
        h.send(.changed(.endpointSlice(F.slice("web", ["198.51.100.6"]))))
        #expect(await h.waitFor { h.installer.calls.count == 2 })
        let api = F.service("api", lb: "203.0.113.11")
        h.send(.invalidObject(.services, api.id, message: "spec.ports[0].port: bad"))
        h.send(.changed(.service(api)))
        var s = ClusterObjects(); s.services = [F.service("web", lb: "203.0.113.10"), api]
        h.send(.listed(.services, s, resourceVersion: "9", invalid: []))
        try? await Task.sleep(for: .milliseconds(200))
        h.releaseUpdates(gate)
        #expect(await h.waitFor { h.observer.reports.withLock { $0.count } >= 3 })
        try? await Task.sleep(for: .milliseconds(200))
        let last = try #require(h.observer.reports.withLock { $0.last })
        #expect((last.skippedByReason[.invalidObject] ?? 0) == 0, "\(last.skippedByReason)")
        await h.stop()
    }

}
