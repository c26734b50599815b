import AgentOperations
import Foundation
import NIOConcurrencyHelpers
import Testing

/// A clock the test moves by hand.
final class FakeClock: Sendable {
    private let value: NIOLockedValueBox<Date>
    init(_ start: Date = Date(timeIntervalSince1970: 1_796_134_279)) { value = NIOLockedValueBox(start) }
    var now: Date { value.withLockedValue { $0 } }
    func advance(_ seconds: Double) { value.withLockedValue { $0 = $0.addingTimeInterval(seconds) } }
}

@Suite struct ListenAddressTests {
    @Test func acceptedForms() throws {
        #expect(try ListenAddress.parse("127.0.0.1:10269", flag: "--x") == ListenAddress(host: "127.0.0.1", port: 10269))
        #expect(try ListenAddress.parse("0.0.0.0:0", flag: "--x") == ListenAddress(host: "0.0.0.0", port: 0))
        #expect(try ListenAddress.parse("[::]:10270", flag: "--x") == ListenAddress(host: "::", port: 10270))
        #expect(try ListenAddress.parse("[2001:db8::1]:80", flag: "--x")?.description == "[2001:db8::1]:80")
        #expect(try ListenAddress.parse("0", flag: "--x") == nil)
        #expect(ListenAddress.defaultMetrics.description == "127.0.0.1:10269")
        #expect(ListenAddress.defaultHealthz.description == "0.0.0.0:10270")
    }

    @Test(arguments: ["", "10269", ":10269", "localhost:10269", "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536",
                      "127.0.0.1:-1", "127.0.0.1:80a", "::1:10269", "[::1]10269", "[::1:10269", "[127.0.0.1]:80",
                      "256.0.0.1:80", "00", "127.0.0.1:+80", "127.0.0.1:١٢"])
    func malformedIsAUsageError(text: String) {
        #expect(throws: AgentOperationsError.self) { try ListenAddress.parse(text, flag: "--metrics-bind-address") }
        do {
            _ = try ListenAddress.parse(text, flag: "--metrics-bind-address")
        } catch {
            #expect(error.exitCode == 64)
            #expect(error.description.hasPrefix("--metrics-bind-address \(text.debugDescription): "))
        }
    }
}

@Suite struct HealthStateTests {
    @Test func healthyUntilTwiceTheSyncPeriodWithoutSuccessThenHealthyAgain() {
        let clock = FakeClock()
        let h = HealthState(syncPeriod: .seconds(60), now: { clock.now })
        // From start-up, the first sync gets the same grace.
        #expect(h.healthz().status == 200)
        clock.advance(119)
        #expect(h.healthz().status == 200)
        clock.advance(2)
        let down = h.healthz()
        #expect(down.status == 503)
        #expect(down.body.contains("no sync has succeeded in the 2m1s since start-up"))
        h.syncSucceeded(at: clock.now)
        #expect(h.healthz().status == 200)
        clock.advance(120)
        #expect(h.healthz().status == 200)
        clock.advance(1)
        h.syncFailed(reason: "the API server https://192.0.2.10:6443 is unreachable: connection refused")
        let stale = h.healthz()
        #expect(stale.status == 503)
        #expect(stale.body.contains("the last successful sync was 2m1s ago, more than 2 × --sync-period (2m0s)"))
        #expect(stale.body.contains("last error: the API server https://192.0.2.10:6443 is unreachable"))
        h.syncSucceeded(at: clock.now)
        #expect(h.healthz().status == 200)
    }

    @Test func bodiesAreJSONWithKubeProxysFields() throws {
        let clock = FakeClock()
        let h = HealthState(syncPeriod: .seconds(300), now: { clock.now })
        let before = try JSONSerialization.jsonObject(with: Data(h.healthz().body.utf8)) as? [String: Any]
        #expect(before?["lastUpdated"] is NSNull)
        #expect(before?["currentTime"] as? String == "2026-12-01T14:11:19.000Z")
        h.syncSucceeded(at: clock.now.addingTimeInterval(0.25))
        clock.advance(1)
        let after = try JSONSerialization.jsonObject(with: Data(h.healthz().body.utf8)) as? [String: Any]
        #expect(after?["lastUpdated"] as? String == "2026-12-01T14:11:19.250Z")
        #expect(after?["status"] as? String == "ok")
        let ready = try JSONSerialization.jsonObject(with: Data(h.readyz().body.utf8)) as? [String: Any]
        #expect(ready?["status"] as? String == "ready")
    }

    @Test func readyOnlyOnceTheFirstSyncLanded() {
        let clock = FakeClock()
        let h = HealthState(syncPeriod: .seconds(300), now: { clock.now })
        #expect(h.readyz().status == 503)
        #expect(!h.firstSyncLanded)
        h.syncFailed(reason: "kernel refused the batch")
        #expect(h.readyz().body.contains("kernel refused the batch"))
        h.syncSucceeded(at: clock.now)
        #expect(h.readyz().status == 200)
        #expect(h.firstSyncLanded)
        // Readiness stays once reached: a later outage is liveness's business, the rules are still in place.
        clock.advance(10_000)
        #expect(h.readyz().status == 200)
    }
}

@Suite(.serialized) struct AgentHTTPServerTests {
    let loopback = ListenAddress(host: "127.0.0.1", port: 0)

    func start(metrics: AgentMetrics = AgentMetrics(), health: HealthState,
               limits: AgentHTTPServer.Limits = .init()) async throws -> AgentHTTPServer {
        try await AgentHTTPServer.start(metricsAddress: loopback, healthzAddress: loopback, metrics: metrics,
                                        health: health, limits: limits)
    }

    @Test func servesTheThreePathsAndNothingElse() async throws {
        let clock = FakeClock()
        let health = HealthState(syncPeriod: .seconds(30), now: { clock.now })
        let metrics = AgentMetrics()
        let server = try await start(metrics: metrics, health: health)
        defer { Task { await server.stop() } }
        let mp = try #require(server.metricsPort), hp = try #require(server.healthzPort)
        #expect(mp != hp)

        #expect(try await httpGet(port: hp, "/readyz").status == 503)
        metrics.syncFinished(kind: .full, duration: .milliseconds(5), mappingsByFamily: ["ipv4": 7], skippedByReason: [:], at: clock.now)
        health.syncSucceeded(at: clock.now)
        let ready = try await httpGet(port: hp, "/readyz")
        #expect(ready.status == 200)
        #expect(ready.headers["content-type"] == "application/json")
        #expect(try await httpGet(port: hp, "/healthz").status == 200)
        clock.advance(61)
        let unhealthy = try await httpGet(port: hp, "/healthz")
        #expect(unhealthy.status == 503)
        #expect(unhealthy.body.contains("more than 2 × --sync-period"))

        let scrape = try await httpGet(port: mp, "/metrics")
        #expect(scrape.status == 200)
        #expect(scrape.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8")
        #expect(scrape.headers["content-length"] == String(scrape.body.utf8.count))
        let p = try PrometheusText(scrape.body)
        #expect(p.value("hostnet_dnat_mappings", ["family": "ipv4"]) == 7)
        #expect(try await httpGet(port: mp, "/metrics?x=1").status == 200)

        // Each path only on its own listener; anything else 404; other methods 405.
        #expect(try await httpGet(port: mp, "/healthz").status == 404)
        #expect(try await httpGet(port: hp, "/metrics").status == 404)
        for path in ["/", "/metricsx", "/healthz/", "//healthz", "/debug/pprof", "/../metrics"] {
            #expect(try await httpGet(port: mp, path).status == 404, "\(path)")
        }
        let post = try await httpGet(port: mp, "/metrics", method: "POST", extraHeaders: "Content-Length: 0\r\n")
        #expect(post.status == 405)
        #expect(post.headers["allow"] == "GET")
        #expect(try await httpGet(port: hp, "/healthz", method: "DELETE").status == 405)
    }

    @Test func oneAddressForBothServesAllPathsOnOnePort() async throws {
        // Find a free port, then ask for it for both.
        let probe = try await AgentHTTPServer.start(metricsAddress: loopback, healthzAddress: nil, metrics: AgentMetrics(processMetrics: false),
                                                    health: HealthState(syncPeriod: .seconds(1)))
        let port = try #require(probe.metricsPort)
        await probe.stop()
        let same = ListenAddress(host: "127.0.0.1", port: port)
        let server = try await AgentHTTPServer.start(metricsAddress: same, healthzAddress: same, metrics: AgentMetrics(processMetrics: false),
                                                     health: HealthState(syncPeriod: .seconds(1)))
        defer { Task { await server.stop() } }
        #expect(server.metricsPort == port && server.healthzPort == port)
        #expect(try await httpGet(port: port, "/metrics").status == 200)
        #expect(try await httpGet(port: port, "/healthz").status == 200)
    }

    @Test func disabledListenersAreNotStarted() async throws {
        let server = try await AgentHTTPServer.start(metricsAddress: nil, healthzAddress: loopback, metrics: AgentMetrics(processMetrics: false),
                                                     health: HealthState(syncPeriod: .seconds(1)))
        #expect(server.metricsPort == nil)
        #expect(server.healthzPort != nil)
        await server.stop()
        await server.stop()  // idempotent
    }

    @Test func aTakenPortIsUnavailableNamingTheFlagAndNothingIsLeftListening() async throws {
        let first = try await start(health: HealthState(syncPeriod: .seconds(1)))
        defer { Task { await first.stop() } }
        let taken = ListenAddress(host: "127.0.0.1", port: try #require(first.metricsPort))
        do {
            _ = try await AgentHTTPServer.start(metricsAddress: taken, healthzAddress: loopback, metrics: AgentMetrics(processMetrics: false),
                                                health: HealthState(syncPeriod: .seconds(1)))
            Issue.record("bound a taken port")
        } catch {
            #expect(error.exitCode == 69)
            #expect(error.description.contains("cannot listen on \(taken) (--metrics-bind-address): the port is already in use"))
        }
        // An address this node does not have (a documentation address).
        do {
            _ = try await AgentHTTPServer.start(metricsAddress: nil, healthzAddress: ListenAddress(host: "192.0.2.77", port: 0),
                                                metrics: AgentMetrics(processMetrics: false), health: HealthState(syncPeriod: .seconds(1)))
            Issue.record("bound an address that is not on this node")
        } catch {
            #expect(error.exitCode == 69)
            #expect(error.description.contains("(--healthz-bind-address): the address is not assigned to this node"))
        }
    }

    @Test func oversizedHeadersAndRequestsAreRefused() async throws {
        let server = try await start(health: HealthState(syncPeriod: .seconds(1)))
        defer { Task { await server.stop() } }
        let port = try #require(server.healthzPort)
        // One huge header: NIO's decoder limit answers 400 and closes.
        let c = try await RawConnection.connect(port: port)
        try await c.send("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: \(String(repeating: "a", count: 9000))\r\n\r\n")
        #expect(await c.closedWithin(5))
        #expect(c.text.hasPrefix("HTTP/1.1 400") || c.text.isEmpty, "\(c.text.prefix(200))")
        // A request line that never ends, fed in pieces: closed once past the byte budget, never answered 200.
        let d = try await RawConnection.connect(port: port)
        try await d.send("GET /healthz?")
        for _ in 0..<20 { try? await d.send(String(repeating: "b", count: 1000)) }
        #expect(await d.closedWithin(5))
        #expect(!d.text.contains("200 OK"))
        // Still serving afterwards.
        #expect(try await httpGet(port: port, "/healthz").status == 200)
    }

    @Test func connectionsBeyondTheLimitAreClosedAndSlowClientsTimeOut() async throws {
        let limits = AgentHTTPServer.Limits(maxConnections: 4, requestTimeout: .milliseconds(500))
        let server = try await start(health: HealthState(syncPeriod: .seconds(1)), limits: limits)
        defer { Task { await server.stop() } }
        let port = try #require(server.healthzPort)
        var held: [RawConnection] = []
        for _ in 0..<4 {
            let c = try await RawConnection.connect(port: port)
            try await c.send("GET /healthz HTTP/1.1\r\n")  // incomplete: holds its slot
            held.append(c)
        }
        try await Task.sleep(for: .milliseconds(100))
        let extra = try await RawConnection.connect(port: port)
        #expect(await extra.closedWithin(2), "a fifth connection was kept open with a limit of 4")
        #expect(extra.text.isEmpty)
        // The held ones never complete their request: each is closed at its deadline, freeing the slots.
        for c in held { #expect(await c.closedWithin(5)) }
        #expect(held.allSatisfy { !$0.text.contains("200") })
        try await Task.sleep(for: .milliseconds(100))
        #expect(try await httpGet(port: port, "/healthz").status == 200)
    }

    @Test func keepAliveServesSeveralRequestsOnOneConnection() async throws {
        let server = try await start(health: HealthState(syncPeriod: .seconds(1)))
        defer { Task { await server.stop() } }
        let c = try await RawConnection.connect(port: try #require(server.metricsPort))
        let get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        try await c.send(get + get + "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        #expect(await c.closedWithin(5))
        #expect(c.text.components(separatedBy: "HTTP/1.1 200 OK").count - 1 == 3)
    }

    @Test func startAndStopLeaveNoListener() async throws {
        let server = try await start(health: HealthState(syncPeriod: .seconds(1)))
        let port = try #require(server.metricsPort)
        await server.stop()
        await #expect(throws: (any Error).self) { _ = try await httpGet(port: port, "/metrics") }
    }
}
