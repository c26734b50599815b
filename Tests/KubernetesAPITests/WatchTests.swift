import Foundation
import KubeObjects
import NIOCore
import Testing
@testable import KubernetesAPI

/// `KubernetesWatch` against the real HTTPS test server: lists, then chunked watch bodies written over time.
@Suite("Kubernetes API: list + watch")
struct WatchTests {
    @Test("list, then watch from the list's version: ADDED/MODIFIED/DELETED arrive in order")
    func listThenWatch() async throws {
        let cluster = Box(FakeCluster.standard)
        let handler = watchServing(cluster) { w in
            guard w.resource == "services", w.number == 0 else { return nil }
            return .stream(200) { s in
                await s.write(watchLine("ADDED", service("shop", "new", port: 8000, rv: "4712")))
                await s.write(watchLine("MODIFIED", service("default", "web", port: 444, rv: "4713")))
                await s.write(watchLine("DELETED", service("default", "dual", port: 80, rv: "4714")))
            }
        }
        try await withWatch(handler) { server, events in
            let seen = try await events.wait("three service changes and the slices' list") {
                $0.changes(.services).count == 3 && !$0.of(.endpointSlices).isEmpty
            }
            #expect(seen.described(.services) == [
                "listed services: default/dual :80, default/web :443, kube-system/dns :53, shop/api :80, shop/headless :5432 @4711",
                "service shop/new :8000",
                "service default/web :444",
                "service deleted default/dual",
            ])
            let watch = try #require(server.requests.first { $0.path == "/api/v1/services" && $0.query["watch"] != nil })
            #expect(watch.query["watch"] == "1")
            #expect(watch.query["resourceVersion"] == "4711")
            #expect(watch.query["allowWatchBookmarks"] == "true")
            #expect(watch.query["timeoutSeconds"].flatMap(Int.init).map { (300...600).contains($0) } == true)
            #expect(watch.authorization == "Bearer \(testToken)")
            // The slices were listed (all five, no selector) and their watch is open.
            #expect(seen.described(.endpointSlices).first?.hasPrefix("listed endpointslices: default/dual-v4, default/dual-v6, default/web-x1, kube-system/dns-a, shop/api-q9 @4711") == true)
        }
    }

    @Test("a BOOKMARK moves the version: after the server ends the watch, the next one starts from the bookmark")
    func bookmarkMovesTheVersion() async throws {
        let handler = watchServing(Box(.standard)) { w in
            guard w.resource == "services", w.number == 0 else { return nil }
            return .stream(200) { s in
                await s.write(bookmark("5000"))
                await s.end()
            }
        }
        try await withWatch(handler) { server, events in
            try await waitUntil("a second service watch") { server.watches("services").count == 2 }
            #expect(server.watches("services").map { $0.query["resourceVersion"] } == ["4711", "5000"])
            let seen = try await events.wait("the restart") { $0.described(.services).count == 2 }
            #expect(seen.described(.services).last == "restarted services timeout")
            // No relist: one paged list of services (three pages).
            #expect(server.lists("services").count == 3)
        }
    }

    @Test("an ERROR event with Status 410 relists, and the next watch starts from the new list")
    func errorEventGoneRelists() async throws {
        let cluster = Box(FakeCluster.standard)
        let handler = watchServing(cluster) { w in
            guard w.resource == "services", w.number == 0 else { return nil }
            return .stream(200) { s in
                cluster.update { $0.resourceVersion = "6000" }
                await s.write(watchLine("ERROR", nil, status: status(410, "Expired", "too old resource version: 4711 (5990)")))
                // The server keeps the connection open: the client must stop reading by itself.
            }
        }
        try await withWatch(handler) { server, events in
            let seen = try await events.wait("the second list") { $0.described(.services).count == 3 }
            let described = seen.described(.services)
            #expect(described[0].hasSuffix("@4711"))
            #expect(described[1] == "restarted services gone")
            #expect(described[2].hasSuffix("@6000"))
            try await waitUntil("the watch after the relist") { server.watches("services").count == 2 }
            #expect(server.watches("services")[1].query["resourceVersion"] == "6000")
        }
    }

    @Test("HTTP 410 on the watch request relists")
    func httpGoneOnWatchRelists() async throws {
        let cluster = Box(FakeCluster.standard)
        let handler = watchServing(cluster) { w in
            guard w.resource == "services", w.number == 0 else { return nil }
            cluster.update { $0.resourceVersion = "6000" }
            return .json(410, status(410, "Gone", "too old resource version"))
        }
        try await withWatch(handler) { server, events in
            let seen = try await events.wait("the second list") { $0.described(.services).count == 3 }
            #expect(seen.described(.services)[1] == "restarted services gone")
            #expect(seen.described(.services)[2].hasSuffix("@6000"))
            #expect(server.lists("services").count == 6)
            try await waitUntil("the watch after the relist") { server.watches("services").count == 2 }
            #expect(server.watches("services")[1].query["resourceVersion"] == "6000")
        }
    }

    @Test("a connection dropped in the middle of the body: backoff, then a watch from the last event's version")
    func droppedConnectionRewatches() async throws {
        let handler = watchServing(Box(.standard)) { w in
            guard w.resource == "services", w.number == 0 else { return nil }
            return .stream(200) { s in
                await s.write(watchLine("ADDED", service("shop", "new", port: 8000, rv: "4800")))
                await s.drop()
            }
        }
        try await withWatch(handler) { server, events in
            try await waitUntil("the second watch") { server.watches("services").count == 2 }
            #expect(server.watches("services")[1].query["resourceVersion"] == "4800")
            #expect(server.lists("services").count == 3)  // no relist
            let seen = try await events.wait("the restart") { $0.described(.services).count >= 4 }
            let described = seen.described(.services)
            #expect(Array(described[1...2]) == ["service shop/new :8000", "restarted services error"])
            #expect(described[3].hasPrefix("unavailable services (retry in "))
            #expect(described[3].contains("broke off"))
        }
    }

    @Test("a server that is down for a while: .unavailable with backoff, then the lists and watches start")
    func serverDownThenUp() async throws {
        let port = try await closedPort()
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: "https://127.0.0.1:\(port)")
        let tuning = WatchTuning(initialBackoff: .milliseconds(50), maxBackoff: .milliseconds(200))
        let watch = try KubernetesWatch(.init(kubeconfig: config), environment: ws.environment(), tuning: tuning)
        let events = EventRecorder(watch)
        var server: TestAPIServer? = nil
        do {
            let down = try await events.wait("three refusals") { $0.described(.services).count >= 3 }
            for line in down.described(.services) {
                #expect(line.hasPrefix("unavailable services"))
                #expect(line.contains("connection refused"))
            }
            for case .unavailable(_, let error, let wait) in down {
                #expect(wait <= .milliseconds(200))
                #expect(error.kind == .unavailable)
            }
            #expect(down.connected(.services) == 0 && down.connected(.endpointSlices) == 0, "connected while refused")
            server = try await TestAPIServer.start(port: port, handler: watchServing(Box(.standard)) { _ in nil })
            try await events.wait("both lists") {
                $0.described(.services).contains { $0.hasPrefix("listed") }
                    && $0.described(.endpointSlices).contains { $0.hasPrefix("listed") }
            }
            try await waitUntil("both watches") { server!.watches("services").count == 1 && server!.watches("endpointslices").count == 1 }
            // Each opened watch says so: how a consumer learns the outage is over when nothing changed.
            try await events.wait("connected") { $0.connected(.services) >= 1 && $0.connected(.endpointSlices) >= 1 }
        } catch {
            await events.stop(); await server?.stop()
            throw error
        }
        await events.stop(); await server?.stop()
    }

    @Test("a line split across chunks (inside a UTF-8 character), and several lines in one chunk")
    func chunkBoundaries() async throws {
        var first = service("shop", "one", port: 8001, rv: "4801")
        first.labels = ["team": "grüße"]
        let a = Array(watchLine("ADDED", first).utf8)
        let cut = try #require(a.firstIndex(of: 0xC3)) + 1  // between the two bytes of "ü"
        let handler = watchServing(Box(.standard)) { w in
            guard w.resource == "services", w.number == 0 else { return nil }
            return .stream(200) { s in
                await s.write(bytes: Array(a[..<cut]))
                try? await Task.sleep(for: .milliseconds(50))
                await s.write(bytes: Array(a[cut...])
                              + Array((watchLine("ADDED", service("shop", "two", port: 8002, rv: "4802"))
                                       + "\n" + watchLine("ADDED", service("shop", "three", port: 8003, rv: "4803"))).utf8))
                await s.end()
            }
        }
        try await withWatch(handler) { server, events in
            let seen = try await events.wait("three changes") { $0.changes(.services).count == 3 }
            #expect(seen.changes(.services).map { describe($0) } == ["service shop/one :8001", "service shop/two :8002", "service shop/three :8003"])
            guard case .changed(.service(let one)) = seen.changes(.services)[0] else { return }
            #expect(one.labels["team"] == "grüße")
            try await waitUntil("the next watch") { server.watches("services").count == 2 }
            #expect(server.watches("services")[1].query["resourceVersion"] == "4803")
        }
    }

    @Test("a watch line longer than the cap breaks that watch; nothing grows without bound")
    func overlongLineRestarts() async throws {
        var object = service("shop", "big", port: 8000, rv: "4900")
        object.labels = ["filler": String(repeating: "x", count: 4000)]
        let big = object
        let handler = watchServing(Box(.standard)) { w in
            guard w.resource == "services", w.number == 0 else { return nil }
            return .stream(200) { s in
                await s.write(watchLine("ADDED", big))
            }
        }
        let tuning = WatchTuning(initialBackoff: .milliseconds(50), maxBackoff: .milliseconds(200), maxLineBytes: 2048)
        try await withWatch(handler, tuning: tuning) { server, events in
            let seen = try await events.wait("the restart") { $0.described(.services).count >= 3 }
            #expect(seen.described(.services)[1] == "restarted services error")
            #expect(seen.described(.services)[2].contains("a watch event is longer than 2048 bytes"))
            try await waitUntil("the next watch") { server.watches("services").count == 2 }
            #expect(server.watches("services")[1].query["resourceVersion"] == "4711")
        }
    }

    @Test("a watch that keeps adding objects stops at the item limit, as a list that long does; changes to kept objects still arrive")
    func watchStopsAtTheItemLimit() async throws {
        // The standard cluster lists 5 services; the limit is 6.
        let handler = watchServing(Box(.standard)) { w in
            guard w.resource == "services", w.number == 0 else { return nil }
            return .stream(200) { s in
                await s.write(watchLine("ADDED", service("shop", "new1", port: 8000, rv: "4712")))
                await s.write(watchLine("MODIFIED", service("default", "web", port: 444, rv: "4713")))
                for i in 2...50 { await s.write(watchLine("ADDED", service("shop", "new\(i)", port: 8000, rv: "\(4712 + i)"))) }
            }
        }
        try await withWatch(handler, maxItems: 6) { server, events in
            let seen = try await events.wait("the stop") { $0.described(.services).count >= 5 }
            let described = seen.described(.services)
            #expect(described[1] == "service shop/new1 :8000")
            #expect(described[2] == "service default/web :444")
            #expect(described[3] == "restarted services error")
            #expect(described[4].contains("more than 6 objects would be kept; stopped (the item limit); listing again"), "\(described)")
            #expect(!described.contains { $0.contains("new2") })
            // Not a watch from past the refused object (it would never be sent again): a new list.
            try await waitUntil("the relist") {
                server.requests.filter { $0.path == "/api/v1/services" && $0.query["watch"] == nil }.count >= 2
            }
            #expect(server.watches("services").count == 1)
        }
    }

    @Test("lists that work between watches that hit the item limit do not reset the backoff (no relist storm)")
    func itemLimitRelistsBackOff() async throws {
        // Every list has 5 services (under the limit of 6), every watch adds two more (over it).
        let handler = watchServing(Box(.standard)) { w in
            guard w.resource == "services" else { return nil }
            return .stream(200) { s in
                await s.write(watchLine("ADDED", service("shop", "a\(w.number)", port: 8000, rv: "\(5000 + 2 * w.number)")))
                await s.write(watchLine("ADDED", service("shop", "b\(w.number)", port: 8000, rv: "\(5001 + 2 * w.number)")))
            }
        }
        let tuning = WatchTuning(initialBackoff: .milliseconds(50), maxBackoff: .seconds(2))
        try await withWatch(handler, tuning: tuning, maxItems: 6) { server, events in
            try await Task.sleep(for: .milliseconds(2000))
            let lists = Events(all: events.current, port: nil).described(.services).filter { $0.hasPrefix("listed") }.count
            // Backing off 50, 100, 200, 400, 800 ms: about six lists in 2 s; resetting it each time: 20 or more.
            #expect(lists >= 2 && lists <= 9, "\(lists) lists in 2 s")
            _ = server
        }
    }

    @Test("a watch that stays silent longer than timeoutSeconds + grace counts as a dead connection")
    func silentWatchRestarts() async throws {
        let handler = watchServing(Box(.standard)) { _ in nil }  // every watch: head, then nothing
        let tuning = WatchTuning(initialBackoff: .milliseconds(50), maxBackoff: .milliseconds(200),
                                 watchTimeoutSeconds: 1...1, silenceGrace: .milliseconds(300))
        try await withWatch(handler, tuning: tuning) { server, events in
            let seen = try await events.wait("the restart") { $0.described(.services).count >= 3 }
            #expect(seen.described(.services)[1] == "restarted services error")
            #expect(seen.described(.services)[2].contains("sent nothing (not even a bookmark) for 1.3s"))
            #expect(server.watches("services").first?.query["timeoutSeconds"] == "1")
        }
    }

    @Test("undecodable objects in a list page and in a watch event are reported by name and field; the rest arrives; the last good copy stays")
    func invalidObjectsAreReportedAndSkipped() async throws {
        var base = FakeCluster.standard
        base.services.append(FakeObject(kind: "Service", apiVersion: "v1", namespace: "shop", name: "broken",
                                        body: #""spec":{"ports":[{"port":70000}]}"#))
        let cluster = Box(base)
        let handler = watchServing(cluster) { w in
            guard w.resource == "services", w.number == 0 else { return nil }
            return .stream(200) { s in
                var bad = service("default", "web", port: 1, rv: "4800")
                bad.body = #""spec":5"#
                await s.write(watchLine("MODIFIED", bad))
                await s.write(watchLine("ADDED", service("shop", "new", port: 8000, rv: "4801")))
                // The next list has the broken web too: its last good copy must survive the relist.
                cluster.update {
                    $0.resourceVersion = "6000"
                    $0.services[0].body = #""spec":{"ports":[{"port":70000}]}"#
                }
                await s.write(watchLine("ERROR", nil, status: status(410, "Expired", "too old")))
            }
        }
        try await withWatch(handler) { _, events in
            let seen = try await events.wait("the relist") { $0.described(.services).filter { $0.hasPrefix("listed") }.count == 2 }
            let described = seen.described(.services)
            #expect(described[0] == "invalid services shop/broken: https://127.0.0.1:PORT/api/v1/services: Service shop/broken: spec.ports[0].port: port 70000 is out of range 1-65535")
            #expect(described[1] == "listed services: default/dual :80, default/web :443, kube-system/dns :53, shop/api :80, shop/headless :5432 @4711")
            #expect(described[2] == "invalid services default/web: https://127.0.0.1:PORT/api/v1/services (watch): Service default/web: spec: expected an object, got a number")
            #expect(described[3] == "service shop/new :8000")
            #expect(described[4] == "restarted services gone")
            #expect(described[5] == "invalid services default/web: https://127.0.0.1:PORT/api/v1/services: Service default/web: spec.ports[0].port: port 70000 is out of range 1-65535")
            #expect(described[6].hasPrefix("invalid services shop/broken: "))
            // web keeps its last good version (port 443); shop/new came from the watch but is not in the new
            // list, so the relist removes it.
            #expect(described[7] == "listed services: default/dual :80, default/web :443, kube-system/dns :53, shop/api :80, shop/headless :5432 @6000")
        }
    }

    @Test("the one-shot load stays strict: the same broken item fails it (exit 65), naming the object and field")
    func loadStaysStrict() async throws {
        var cluster = FakeCluster.standard
        cluster.services.append(FakeObject(kind: "Service", apiVersion: "v1", namespace: "shop", name: "broken",
                                           body: #""spec":{"ports":[{"port":70000}]}"#))
        let server = try await TestAPIServer.start(handler: serving(cluster))
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        let error = try #require(await loadError(.init(kubeconfig: config), ws.environment()))
        #expect(error.exitCode == 65)
        #expect(error.description == "\(server.url)/api/v1/services: Service shop/broken: spec.ports[0].port: port 70000 is out of range 1-65535")
    }

    @Test("a 401 on the watch request runs the exec plugin again and watches with the new token, as lists do")
    func execPluginRerunOnWatch401() async throws {
        // The plugin's token is the time it ran (ns); the server accepts tokens not older than `oldest`.
        let oldest = Box(0)
        let cluster = FakeCluster.standard
        let handler: @Sendable (RecordedRequest) -> Reply = { r in
            guard let t = r.authorization?.split(separator: "-").last.flatMap({ Int($0) }), t >= oldest.get() else {
                return .json(401, status(401, "Unauthorized", "Unauthorized"))
            }
            if r.query["watch"] != nil {
                if r.path == "/api/v1/services", oldest.get() == 0 {
                    // The first services watch: every token issued so far has just expired.
                    oldest.set(Int(Date().timeIntervalSince1970 * 1e9))
                    return .json(401, status(401, "Unauthorized", "Unauthorized"))
                }
                return .stream(200) { _ in }
            }
            return cluster.reply(r)!
        }
        let server = try await TestAPIServer.start(handler: handler)
        let ws = try Workspace()
        try ws.write("plugin.sh", """
            #!/bin/sh
            echo "{\\"kind\\":\\"ExecCredential\\",\\"apiVersion\\":\\"client.authentication.k8s.io/v1\\",\\"status\\":{\\"token\\":\\"tok-$(date +%s%N)\\"}}"

            """, executable: true)
        let config = try ws.write("config", kubeconfig(server: server.url,
            clusterFields: "certificate-authority: \(PKI.shared.caCert)",
            userFields: "exec:\n  apiVersion: client.authentication.k8s.io/v1\n  command: ./plugin.sh\n  interactiveMode: Never"))
        let events = EventRecorder(try KubernetesWatch(.init(kubeconfig: config), environment: ws.environment(), tuning: fastTuning))
        do {
            try await waitUntil("the services watch with a fresh token") {
                server.watches("services").count == 2
            }
            let watches = server.watches("services")
            #expect(watches[0].authorization != watches[1].authorization)
            // Refreshed inside the session: no failure reached the consumer.
            #expect(!events.current.contains { if case .unavailable(.services, _, _) = $0 { true } else { false } })
        } catch {
            await events.stop(); await server.stop()
            throw error
        }
        await events.stop(); await server.stop()
    }

    @Test("cancelling the consuming task ends the stream and closes the open watch connections")
    func cancellationClosesWatches() async throws {
        let opened = Box<[ResponseStream]>([])
        let handler = watchServing(Box(.standard)) { _ in
            .stream(200) { s in opened.update { $0.append(s) } }
        }
        try await withWatch(handler) { _, events in
            try await waitUntil("both watches open") { opened.get().count == 2 }
            let start = ContinuousClock.now
            await events.stop()
            for s in opened.get() {
                let closed = Box(false)
                let waiter = Task { await s.closed(); closed.set(true) }
                try await waitUntil("the watch connection closes", timeout: .seconds(5)) { closed.get() }
                waiter.cancel()
            }
            let elapsed = ContinuousClock.now - start
            // The requirement is "under a second"; the bound here only keeps a loaded machine from flaking.
            #expect(elapsed < .seconds(5))
        }
    }

    @Test("403 on the list: .unavailable with the forbidden message, retried until allowed")
    func forbiddenListIsRetried() async throws {
        let allowed = Box(false)
        let cluster = FakeCluster.standard
        let inner = watchServing(Box(cluster)) { _ in nil }
        let handler: @Sendable (RecordedRequest) -> Reply = { r in
            if r.path == "/api/v1/services", r.query["watch"] == nil, !allowed.get() {
                return .json(403, status(403, "Forbidden", "services is forbidden: User \"system:serviceaccount:kube-system:hostnet-dnat\" cannot list resource \"services\" in API group \"\" at the cluster scope"))
            }
            return inner(r)
        }
        try await withWatch(handler) { server, events in
            let refused = try await events.wait("two refusals") { $0.described(.services).count >= 2 }
            for case .unavailable(.services, let error, _) in refused {
                #expect(error.kind == .unauthorized && error.httpStatus == 403)
                #expect(error.description.hasPrefix("forbidden: kubeconfig user \"admin\""))
                #expect(error.description.contains("cannot list services in all namespaces"))
                #expect(!error.description.contains(testToken))
            }
            allowed.set(true)
            try await events.wait("the list") { $0.described(.services).contains { $0.hasPrefix("listed") } }
            try await waitUntil("the watch") { server.watches("services").count == 1 }
        }
    }

    @Test("403 on the watch request (RBAC grants list but not watch): .unavailable naming the verb, the list is not repeated")
    func forbiddenWatchIsRetried() async throws {
        let handler = watchServing(Box(.standard)) { w in
            guard w.resource == "services", w.number < 2 else { return nil }
            return .json(403, status(403, "Forbidden", "services is forbidden: cannot watch resource \"services\""))
        }
        try await withWatch(handler) { server, events in
            try await waitUntil("the third watch") { server.watches("services").count == 3 }
            let seen = try await events.wait("two refusals") { $0.described(.services).count >= 3 }
            #expect(seen.described(.services)[0].hasPrefix("listed services"))
            for case .unavailable(.services, let error, _) in seen {
                #expect(error.httpStatus == 403)
                #expect(error.description.contains("cannot watch services in all namespaces"))
                #expect(error.description.contains("grant watch on services"))
            }
            #expect(server.watches("services").allSatisfy { $0.query["resourceVersion"] == "4711" })
            #expect(server.lists("services").count == 3)
        }
    }

    @Test("with namespaces, one list+watch per namespace; the first .listed waits for all of them; a relist replaces only its namespace")
    func namespacesAreWatchedSeparately() async throws {
        let shopWatches = Box(0)
        let handler = watchServing(Box(.standard)) { w in
            guard w.request.path == "/api/v1/namespaces/shop/services", shopWatches.update({ n in n += 1; return n }) == 1 else { return nil }
            // The first shop watch: 410. The relist must keep the default namespace's objects.
            return .json(410, status(410, "Expired", "too old"))
        }
        try await withWatch(handler, namespaces: ["default", "shop"], labelSelector: "tier=front") { server, events in
            let seen = try await events.wait("the relist of shop") { $0.described(.services).filter { $0.hasPrefix("listed") }.count == 2 }
            let listed = seen.described(.services).filter { $0.hasPrefix("listed") }
            // Both namespaces in every set; the selector went to the server.
            #expect(listed.allSatisfy { $0.hasPrefix("listed services: default/web :443, shop/api :80 @") })
            #expect(server.watches("services").allSatisfy { $0.query["labelSelector"] == "tier=front" })
            // Slices are not filtered by the selector: every slice of both namespaces.
            let slices = try await events.wait("the slices") { $0.described(.endpointSlices).contains { $0.hasPrefix("listed") } }
            #expect(slices.described(.endpointSlices).first { $0.hasPrefix("listed") }?
                .hasPrefix("listed endpointslices: default/dual-v4, default/dual-v6, default/web-x1, shop/api-q9 @") == true)
            #expect(server.watches("endpointslices").allSatisfy { $0.query["labelSelector"] == nil })
        }
    }
}

@Suite("Kubernetes API: watch pieces")
struct WatchUnitTests {
    @Test func lineSplitterJoinsAndSplitsChunks() throws {
        var splitter = LineSplitter(limit: 16)
        var lines: [String] = []
        let collect = { (l: [UInt8]) -> Bool in lines.append(String(decoding: l, as: UTF8.self)); return true }
        try splitter.feed(Array("ab".utf8), line: collect)
        try splitter.feed(Array("c\nde\n\n  \nf".utf8), line: collect)
        #expect(lines == ["abc", "de"])
        try splitter.feed(Array("g\n".utf8), line: collect)
        #expect(lines == ["abc", "de", "fg"])
        try splitter.feed(Array("tail".utf8), line: collect)
        #expect(splitter.remainder() == Array("tail".utf8))
        #expect(splitter.remainder() == nil)
    }

    @Test func lineSplitterRefusesOverlongLinesEvenAcrossChunks() {
        var splitter = LineSplitter(limit: 8)
        #expect(throws: LineSplitter.TooLong.self) {
            try splitter.feed(Array("12345".utf8)) { _ in true }
            try splitter.feed(Array("6789".utf8)) { _ in true }
        }
        var other = LineSplitter(limit: 8)
        #expect(throws: LineSplitter.TooLong.self) { try other.feed(Array("123456789\n".utf8)) { _ in true } }
        var exact = LineSplitter(limit: 8)
        #expect(throws: Never.self) { try exact.feed(Array("12345678\n".utf8)) { _ in true } }
    }

    @Test func lineSplitterStopsWhenAsked() throws {
        var splitter = LineSplitter(limit: 100)
        var lines: [String] = []
        try splitter.feed(Array("a\nb\nc\n".utf8)) { l in lines.append(String(decoding: l, as: UTF8.self)); return false }
        #expect(lines == ["a"])
    }

    @Test func backoffDoublesWithJitterUpToTheCapAndResets() {
        var b = Backoff(initial: .milliseconds(100), cap: .milliseconds(350))
        let waits = (0..<5).map { _ in b.next() }
        #expect((Duration.milliseconds(80)...Duration.milliseconds(120)).contains(waits[0]))
        #expect((Duration.milliseconds(160)...Duration.milliseconds(240)).contains(waits[1]))
        #expect(waits[2...].allSatisfy { $0 >= .milliseconds(280) && $0 <= .milliseconds(350) })
        b.reset()
        #expect(b.next() <= .milliseconds(120))
    }

    @Test func badTuningIsAConfigurationError() throws {
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: "https://127.0.0.1:1")
        #expect(throws: KubernetesAPIError.self) {
            _ = try KubernetesWatch(.init(kubeconfig: config), environment: ws.environment(),
                                    tuning: WatchTuning(initialBackoff: .seconds(2), maxBackoff: .seconds(1)))
        }
        #expect(throws: KubernetesAPIError.self) {
            _ = try KubernetesWatch(.init(kubeconfig: config, namespaces: ["Bad"]), environment: ws.environment())
        }
    }
}

// MARK: helpers

/// Short waits so that restarts happen within the test.
let fastTuning = WatchTuning(initialBackoff: .milliseconds(50), maxBackoff: .milliseconds(200))

struct WatchRequest {
    /// "services" or "endpointslices".
    var resource: String
    /// 0 for the first watch of this resource (all namespaces together), 1 for the next…
    var number: Int
    var request: RecordedRequest
}

/// Lists from `cluster` (as it is at the time of each request), watches from `watch`; a watch it answers
/// nil for gets a response head and then silence (an open, quiet watch).
func watchServing(_ cluster: Box<FakeCluster>,
                  watch: @escaping @Sendable (WatchRequest) -> Reply?) -> @Sendable (RecordedRequest) -> Reply {
    let counts = Box<[String: Int]>([:])
    return { r in
        guard r.authorization == "Bearer \(testToken)" else { return .json(401, status(401, "Unauthorized", "Unauthorized")) }
        if r.query["watch"] != nil {
            let resource = r.path.hasSuffix("/services") ? "services" : "endpointslices"
            let n = counts.update { c in
                defer { c[resource, default: 0] += 1 }
                return c[resource, default: 0]
            }
            return watch(WatchRequest(resource: resource, number: n, request: r)) ?? .stream(200) { _ in }
        }
        return cluster.get().reply(r) ?? .json(404, status(404, "NotFound", "not found"))
    }
}

extension TestAPIServer {
    func watches(_ resource: String) -> [RecordedRequest] {
        requests.filter { $0.path.hasSuffix("/\(resource)") && $0.query["watch"] != nil }
    }

    func lists(_ resource: String) -> [RecordedRequest] {
        requests.filter { $0.path.hasSuffix("/\(resource)") && $0.query["watch"] == nil }
    }
}

/// Starts the server and a watch on it, runs `body`, then stops both (also when `body` fails).
func withWatch(_ handler: @escaping @Sendable (RecordedRequest) -> Reply, namespaces: [String] = [],
               labelSelector: String? = nil, tuning: WatchTuning = fastTuning, maxItems: Int? = nil,
               _ body: (TestAPIServer, EventRecorder) async throws -> Void) async throws {
    let server = try await TestAPIServer.start(handler: handler)
    let events: EventRecorder
    do {
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        var options = KubernetesSourceOptions(kubeconfig: config, namespaces: namespaces, labelSelector: labelSelector)
        if let maxItems { options.maxItems = maxItems }
        let watch = try KubernetesWatch(options, environment: ws.environment(), tuning: tuning)
        events = EventRecorder(watch, port: server.port)
    } catch {
        await server.stop()
        throw error
    }
    do {
        try await body(server, events)
    } catch {
        await events.stop(); await server.stop()
        throw error
    }
    await events.stop(); await server.stop()
}

struct WaitTimedOut: Error {}

/// Polls `condition` until it holds; records an issue and throws after `timeout`.
func waitUntil(_ what: String, timeout: Duration = .seconds(20), _ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while !condition() {
        guard ContinuousClock.now < deadline else {
            Issue.record("timed out waiting for \(what)")
            throw WaitTimedOut()
        }
        try await Task.sleep(for: .milliseconds(10))
    }
}

/// Consumes `watch.events()` in a task of its own and keeps what arrives.
final class EventRecorder: Sendable {
    private let box = Box<[SourceEvent]>([])
    private let task: Task<Void, Never>
    /// The server's port, replaced by PORT in described events.
    let port: Int?

    init(_ watch: KubernetesWatch, port: Int? = nil) {
        let box = self.box
        self.port = port
        task = Task { for await e in watch.events() { box.update { $0.append(e) } } }
    }

    /// Waits until `condition` holds for the events so far and returns them.
    @discardableResult
    func wait(_ what: String, _ condition: (Events) -> Bool) async throws -> Events {
        var current = Events(all: box.get(), port: port)
        do {
            try await waitUntil(what) {
                current = Events(all: box.get(), port: port)
                return condition(current)
            }
        } catch {
            Issue.record("events so far:\n\(current.all.map { describe($0, port: port) }.joined(separator: "\n"))")
            throw error
        }
        return current
    }

    /// The events so far.
    var current: [SourceEvent] { box.get() }

    /// Cancels the consuming task and waits for it to end.
    func stop() async {
        task.cancel()
        await task.value
    }
}

struct Events: Sequence {
    var all: [SourceEvent]
    var port: Int?

    func makeIterator() -> IndexingIterator<[SourceEvent]> { all.makeIterator() }

    /// The events of one resource, without `.connected` (which marks every opened watch; `connected(_:)`
    /// counts those).
    func of(_ resource: APIResource) -> [SourceEvent] {
        all.filter { e in
            if case .connected = e { return false }
            return e.resource == resource
        }
    }

    /// How many watches of `resource` were opened.
    func connected(_ resource: APIResource) -> Int {
        all.filter { if case .connected(let r) = $0 { return r == resource } else { return false } }.count
    }

    func described(_ resource: APIResource) -> [String] { of(resource).map { describe($0, port: port) } }

    func changes(_ resource: APIResource) -> [SourceEvent] {
        of(resource).filter { if case .changed = $0 { return true } else { return false } }
    }
}

extension SourceEvent {
    var resource: APIResource {
        switch self {
        case .listed(let r, _, _, _), .invalidObject(let r, _, _), .watchRestarted(let r, _), .unavailable(let r, _, _), .connected(let r): return r
        case .changed(.service), .changed(.serviceDeleted): return .services
        case .changed(.endpointSlice), .changed(.endpointSliceDeleted): return .endpointSlices
        }
    }
}

/// One line per event, with what the tests compare: names and ports.
func describe(_ e: SourceEvent, port: Int? = nil) -> String {
    let text: String
    switch e {
    case .listed(let r, let objects, let rv, _):
        let items = r == .services
            ? objects.services.map { "\($0.id) :\($0.ports.map { String($0.port) }.joined(separator: ","))" }
            : objects.endpointSlices.map { "\($0.id)" }
        text = "listed \(r.rawValue): \(items.joined(separator: ", ")) @\(rv)"
    case .changed(.service(let s)): text = "service \(s.id) :\(s.ports.map { String($0.port) }.joined(separator: ","))"
    case .changed(.serviceDeleted(let n)): text = "service deleted \(n)"
    case .changed(.endpointSlice(let s)): text = "slice \(s.id)"
    case .changed(.endpointSliceDeleted(let n)): text = "slice deleted \(n)"
    case .invalidObject(let r, let name, let message): text = "invalid \(r.rawValue) \(name.map { "\($0)" } ?? "?"): \(message)"
    case .watchRestarted(let r, let reason): text = "restarted \(r.rawValue) \(reason.rawValue)"
    case .connected(let r): text = "connected \(r.rawValue)"
    case .unavailable(let r, let error, let wait): text = "unavailable \(r.rawValue) (retry in \(wait)): \(error)"
    }
    guard let port else { return text }
    return text.replacingOccurrences(of: ":\(port)", with: ":PORT")
}

/// A Service with one TCP port.
func service(_ namespace: String, _ name: String, port: Int, rv: String) -> FakeObject {
    FakeObject(kind: "Service", apiVersion: "v1", namespace: namespace, name: name,
               body: "\"spec\":{\"type\":\"ClusterIP\",\"clusterIP\":\"192.0.2.99\",\"ports\":[{\"protocol\":\"TCP\",\"port\":\(port)}]}",
               resourceVersion: rv)
}

/// One watch event line, as kube-apiserver frames it (the object, then a newline).
func watchLine(_ type: String, _ object: FakeObject?, status: String? = nil) -> String {
    "{\"type\":\"\(type)\",\"object\":\(object?.json(withKind: true) ?? status ?? "{}")}\n"
}

func bookmark(_ rv: String) -> String {
    "{\"type\":\"BOOKMARK\",\"object\":{\"kind\":\"Service\",\"apiVersion\":\"v1\",\"metadata\":{\"resourceVersion\":\"\(rv)\"}}}\n"
}

/// One MODIFIED event of a single-endpoint EndpointSlice as kube-apiserver (1.31) sends it on a watch:
/// the whole object, managedFields included. The README's "bytes per change" figure is this line's size.
let typicalSliceModifiedLine = #"""
{"type":"MODIFIED","object":{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"name":"web-7xq2m","generateName":"web-","namespace":"default","uid":"6f1c2a4e-9b3d-4c1e-8f5a-2d7b9e0c4a11","resourceVersion":"918273","generation":7,"creationTimestamp":"2026-11-30T09:12:44Z","labels":{"app":"web","endpointslice.kubernetes.io/managed-by":"endpointslice-controller.k8s.io","kubernetes.io/service-name":"web"},"annotations":{"endpoints.kubernetes.io/last-change-trigger-time":"2026-12-01T14:02:17Z"},"ownerReferences":[{"apiVersion":"v1","kind":"Service","name":"web","uid":"0a9e3c51-7d2b-4f6e-b1c8-5e4a3d2f1b00","controller":true,"blockOwnerDeletion":true}],"managedFields":[{"manager":"kube-controller-manager","operation":"Update","apiVersion":"discovery.k8s.io/v1","time":"2026-12-01T14:02:17Z","fieldsType":"FieldsV1","fieldsV1":{"f:addressType":{},"f:endpoints":{},"f:metadata":{"f:annotations":{".":{},"f:endpoints.kubernetes.io/last-change-trigger-time":{}},"f:generateName":{},"f:labels":{".":{},"f:app":{},"f:endpointslice.kubernetes.io/managed-by":{},"f:kubernetes.io/service-name":{}},"f:ownerReferences":{".":{},"k:{\"uid\":\"0a9e3c51-7d2b-4f6e-b1c8-5e4a3d2f1b00\"}":{}}},"f:ports":{}}}]},"addressType":"IPv4","endpoints":[{"addresses":["198.51.100.21"],"conditions":{"ready":true,"serving":true,"terminating":false},"targetRef":{"kind":"Pod","namespace":"default","name":"web-5d8f7c9b6-k2x7p","uid":"3c2b1a09-8e7d-4c6b-a5f4-e3d2c1b0a987"},"nodeName":"node-a","zone":"zone-1"}],"ports":[{"name":"https","protocol":"TCP","port":8443}]}}

"""#

extension WatchTests {
    @Test("one endpoint change is one MODIFIED line carrying the whole slice (the README's bytes-per-change figure)")
    func typicalSliceChange() async throws {
        let sent = Box<ResponseStream?>(nil)
        let onTheWire = Box(0)
        let handler = watchServing(Box(.standard)) { w in
            guard w.resource == "endpointslices", w.number == 0 else { return nil }
            return .stream(200) { s in
                sent.set(s)
                try? await Task.sleep(for: .milliseconds(20))  // the response head is out
                let before = s.wireBytes.get()
                await s.write(typicalSliceModifiedLine)
                onTheWire.set(s.wireBytes.get() - before)
            }
        }
        try await withWatch(handler) { _, events in
            let seen = try await events.wait("the change") { $0.changes(.endpointSlices).count == 1 }
            guard case .changed(.endpointSlice(let slice)) = seen.changes(.endpointSlices)[0] else {
                Issue.record("not a slice change"); return
            }
            #expect(slice.id.description == "default/web-7xq2m" && slice.serviceName == "web")
            #expect(slice.endpoints.map { $0.addresses.map(\.description) } == [["198.51.100.21"]])
            #expect(slice.endpoints.first?.isReady == true)
            #expect(slice.lastChangeTriggerTime == "2026-12-01T14:02:17Z")
            #expect(sent.get()?.bytesWritten.get() == typicalSliceModifiedLine.utf8.count)
            // The figures the README quotes: one endpoint change costs one line of 1564 bytes, sent as one
            // HTTP/1.1 chunk (hex size and two CRLFs: 7 bytes) in TLS 1.3 records (22 bytes each). This test
            // server (NIO) puts the chunk's three parts in three records: 1637 bytes; a server that writes the
            // chunk at once (kube-apiserver, Go) needs one: 1593.
            #expect(typicalSliceModifiedLine.utf8.count == 1564)
            #expect(onTheWire.get() == 1564 + 7 + 3 * 22)
        }
    }
}

/// What the watch keeps per resource, against a server that invents objects.
@Suite struct ResourceStoreTests {
    func collect(_ stream: AsyncStream<SourceEvent>) async -> [String] {
        var out: [String] = []
        for await e in stream {
            switch e {
            case .listed(_, let o, _, let invalid): out.append("listed \(o.services.count) invalid \(invalid.map { $0.name?.description ?? "?" })")
            case .changed(.service(let s)): out.append("service \(s.id)")
            case .changed(.serviceDeleted(let n)): out.append("deleted \(n)")
            case .invalidObject(_, let n, _): out.append("invalid \(n?.description ?? "?")")
            default: out.append("other")
            }
        }
        return out
    }

    @Test func undecodableNamesCountAgainstTheLimitAndUnknownDeletesAreNotPassedOn() async {
        let (stream, continuation) = AsyncStream.makeStream(of: SourceEvent.self)
        let store = ResourceStore(.services, scopes: [nil], limit: 3, continuation: continuation)
        let a = ObjectName(namespace: "n", name: "a"), b = ObjectName(namespace: "n", name: "b")
        store.listed(scope: nil, ClusterObjects(), invalid: [], resourceVersion: "1")
        #expect(store.changed(.service(Service(id: a))))
        #expect(store.invalid(b, message: "bad"))
        #expect(store.invalid(ObjectName(namespace: "n", name: "c"), message: "bad"))
        // Three names known (one good, two undecodable): a fourth is refused, a known one is not.
        #expect(!store.invalid(ObjectName(namespace: "n", name: "d"), message: "bad"))
        #expect(!store.changed(.service(Service(id: ObjectName(namespace: "n", name: "e")))))
        #expect(store.changed(.service(Service(id: b))))  // b fixed: no longer undecodable
        store.deleted(ObjectName(namespace: "n", name: "never-seen"))
        store.deleted(a)
        store.listed(scope: nil, ClusterObjects(), invalid: [.init(name: b, message: "bad again")], resourceVersion: "2")
        continuation.finish()
        #expect(await collect(stream) == [
            "listed 0 invalid []", "service n/a", "invalid n/b", "invalid n/c", "service n/b", "deleted n/a",
            "invalid n/b", "listed 1 invalid [\"n/b\"]",
        ])
    }
}
