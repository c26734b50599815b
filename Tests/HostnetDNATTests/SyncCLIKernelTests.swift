import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// `hostnet-dnat sync` run as a user would: a real process watching a kube-apiserver stand-in
/// (scripts/fake-apiserver: TLS, list + watch, bookmarks, 410) and programming a "node" namespace, with
/// real TCP and UDP from the node to "pods" behind a veth. Documentation addresses only.
@Suite(.serialized) struct SyncCLIKernelTests {
    static let echoSlice4 = #"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"echo-4","namespace":"test","labels":{"kubernetes.io/service-name":"echo"}},"addressType":"IPv4","ports":[{"name":"tcp","port":8080,"protocol":"TCP"},{"name":"udp","port":5353,"protocol":"UDP"}],"endpoints":ENDPOINTS}"#

    static func slice4(_ addresses: [String]) -> String {
        echoSlice4.replacingOccurrences(of: "ENDPOINTS", with: "[" + addresses.map { #"{"addresses":["\#($0)"]}"# }.joined(separator: ",") + "]")
    }

    static func service(_ name: String, lb: String, port: Int, targetPort: Int, extra: String = "") -> String {
        #"{"apiVersion":"v1","kind":"Service","metadata":{"name":"\#(name)","namespace":"test"\#(extra)},"spec":{"type":"LoadBalancer","clusterIP":"203.0.113.201","ports":[{"name":"tcp","protocol":"TCP","port":\#(port),"targetPort":\#(targetPort)}]},"status":{"loadBalancer":{"ingress":[{"ip":"\#(lb)"}]}}}"#
    }

    static func slice(for service: String, _ addresses: [String], port: Int) -> String {
        #"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"\#(service)-1","namespace":"test","labels":{"kubernetes.io/service-name":"\#(service)"}},"addressType":"IPv4","ports":[{"name":"tcp","port":\#(port),"protocol":"TCP"}],"endpoints":["# + addresses.map { #"{"addresses":["\#($0)"]}"# }.joined(separator: ",") + "]}"
    }

    /// A running `hostnet-dnat sync` against `api`, programming `node`.
    final class Agent {
        let process: LoggingProcess
        init(api: FakeKubeAPI, node: TestNamespace, backend: String, target: String = "endpoints", minSyncPeriod: String = "0s",
             extra: [String] = []) throws {
            process = try LoggingProcess([CLI.binary.path, "sync", "--kubeconfig", api.kubeconfig, "--netns", node.name,
                                          "--backend", backend, "--target", target, "--min-sync-period", minSyncPeriod,
                                          "--log-format", "json", "--log-level", "debug",
                                          "--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "127.0.0.1:0"] + extra,
                                         logPath: api.directory.appendingPathComponent("sync.log").path)
        }

        /// The ports of /metrics and /healthz, from the "serving" log line.
        func port(_ key: String) -> Int? {
            guard let line = process.waitForLine(timeout: 30, { $0.contains("\"serving\"") }),
                  let doc = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else { return nil }
            return (doc[key] as? String).flatMap(Int.init)
        }

        /// Log lines that are JSON objects.
        var records: [[String: Any]] {
            process.lines.compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        }
        var syncs: [[String: Any]] { records.filter { $0["msg"] as? String == "synced" } }

        /// Waits for a sync that changed the kernel after the first `after` syncs; returns it.
        @discardableResult
        func waitForSync(after count: Int, changed: Bool = true, timeout: Double = 20) -> [String: Any]? {
            let deadline = Date().addingTimeInterval(timeout)
            while Date() < deadline {
                let s = syncs
                if let hit = s.dropFirst(count).first(where: { !changed || $0["changed"] as? String == "true" }) { return hit }
                if process.exited != nil { return nil }
                usleep(20_000)
            }
            return nil
        }
    }

    /// node + pods + API + agent, torn down whatever happens.
    func withAgent(backend: String = "nftables", target: String = "endpoints", minSyncPeriod: String = "0s", extra: [String] = [],
                   before: (TestNamespace) throws -> Void = { _ in },
                   _ body: (FakeKubeAPI, TestNamespace, TestNamespace, Agent) throws -> Void) throws {
        try withNodeAndPods { node, pod in
            try before(node)
            try FakeKubeAPI.with(data: trafficCluster) { api in
                let agent = try Agent(api: api, node: node, backend: backend, target: target, minSyncPeriod: minSyncPeriod, extra: extra)
                defer { agent.process.stop() }
                let first = agent.waitForSync(after: 0, changed: false, timeout: 60)
                try #require(first != nil, "no first sync: \(agent.process.log)")
                #expect(first?["kind"] as? String == "full")
                try body(api, node, pod, agent)
            }
        }
    }

    /// Polls `condition` for up to `timeout` seconds (the agent syncs in the background).
    func eventually(timeout: Double = 10, _ condition: () throws -> Bool) throws -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if try condition() { return true }
            usleep(100_000)
        }
        return try condition()
    }

    func servers(_ node: TestNamespace, _ transport: TestTransport = .tcp, host: String = "203.0.113.10", port: Int? = nil,
                 count: Int = 24, timeout: Double = 2) throws -> Set<String> {
        let replies = try exchange(from: node, transport, host: host, port: port ?? (transport == .tcp ? 80 : 53),
                                   count: count, timeout: timeout)
        return Set(replies.map { $0.server ?? "failed" })
    }

    @Test(arguments: ["nftables", "iptables"])
    func followsEndpointAndServiceChanges(backend: String) throws {
        guard try requireKernelTests(tools: ["nft", "iptables-restore", "python3", "openssl"]) else { return }
        try withAgent(backend: backend) { api, node, _, agent in
            #expect(try servers(node) == ["ep1", "ep2"])
            // An endpoint removed from the slice: new connections avoid it.
            var n = agent.syncs.count
            try api.apply(Self.slice4(["198.51.100.12"]))
            #expect(agent.waitForSync(after: n) != nil, "\(agent.process.log)")
            #expect(try servers(node) == ["ep2"])
            #expect(try servers(node, .udp) == ["ep2"])
            // A new Service is reachable; a deleted one is not.
            n = agent.syncs.count
            try api.apply(Self.service("late", lb: "203.0.113.20", port: 80, targetPort: 8080))
            try api.apply(Self.slice(for: "late", ["198.51.100.11"], port: 8080))
            #expect(agent.waitForSync(after: n) != nil)
            #expect(try eventually { try servers(node, host: "203.0.113.20", count: 4, timeout: 0.5) == ["ep1"] })
            n = agent.syncs.count
            try api.delete(kind: "Service", namespace: "test", name: "late")
            #expect(agent.waitForSync(after: n) != nil)
            #expect(try servers(node, host: "203.0.113.20", count: 2, timeout: 0.5) == ["failed"])
            // Each of those syncs was partial, and touched few kernel objects.
            let partial = agent.syncs.dropFirst()
            #expect(partial.allSatisfy { $0["kind"] as? String == "partial" }, "\(partial)")
        }
    }

    @Test func anEstablishedConnectionSurvivesAHundredSyncs() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl"]) else { return }
        try withAgent { api, node, pod, agent in
            // A long-lived echo service on 9090 in the pod namespace, mapped from 203.0.113.30:9000.
            let server = try pod.spawn(["python3", "-c", Self.streamServer], readyMarker: "ready")
            defer { server.stop() }
            var n = agent.syncs.count
            try api.apply(Self.service("stream", lb: "203.0.113.30", port: 9000, targetPort: 9090))
            try api.apply(Self.slice(for: "stream", ["198.51.100.11", "198.51.100.12"], port: 9090))
            #expect(agent.waitForSync(after: n) != nil)
            usleep(300_000)
            let log = api.directory.appendingPathComponent("client.log").path
            let client = try LoggingProcess(["ip", "netns", "exec", node.name, "python3", "-c", Self.streamClient, "203.0.113.30", "9000", "800"],
                                            logPath: log)
            defer { client.stop() }
            let first = client.waitForLine(timeout: 10) { $0.hasPrefix("OK ") }
            let name = try #require(first?.split(separator: " ").dropFirst().first.map(String.init), "\(client.log)")
            let other = name == "s11" ? "198.51.100.12" : "198.51.100.11"
            let remaining = name == "s11" ? "198.51.100.11" : "198.51.100.12"
            // Take the other endpoint away, then make 100 more changes elsewhere: 100 syncs.
            n = agent.syncs.count
            try api.apply(Self.slice(for: "stream", [remaining], port: 9090))
            #expect(agent.waitForSync(after: n) != nil)
            // One change at a time, each waited for: changes that arrive during a sync would be coalesced
            // into one.
            for i in 0..<100 {
                let before = agent.syncs.count
                try api.apply(Self.slice4(i % 2 == 0 ? ["198.51.100.11"] : ["198.51.100.11", "198.51.100.12"]))
                guard agent.waitForSync(after: before, changed: true, timeout: 20) != nil else {
                    Issue.record("change \(i) was not synced: \(agent.process.log.suffix(1500))")
                    break
                }
            }
            #expect(agent.syncs.count - n >= 100, "fewer than 100 syncs: \(agent.syncs.count - n)")
            #expect(client.exited == nil, "the client finished before the 100th sync: the connection was not tested across them")
            _ = other
            #expect(client.waitForExit(timeout: 60) == 0, "\(client.log)")
            let lines = client.lines
            #expect(!lines.contains { $0.hasPrefix("ERR") }, "\(lines.filter { $0.hasPrefix("ERR") })")
            #expect(lines.filter { $0 == "OK \(name)" }.count >= 100, "\(lines.suffix(5))")
            #expect(Set(lines.filter { $0.hasPrefix("OK") }.map { $0.split(separator: " ")[1] }) == [Substring(name)])
        }
    }

    @Test func aUDPClientKeepingItsSocketFollowsTheEndpoint() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl", "conntrack"]) else { return }
        try withAgent { api, node, _, agent in
            try api.apply(Self.slice4(["198.51.100.11"]))
            #expect(agent.waitForSync(after: agent.syncs.count - 1) != nil)
            usleep(300_000)
            let log = api.directory.appendingPathComponent("udp.log").path
            let client = try LoggingProcess(["ip", "netns", "exec", node.name, "python3", "-c", Self.udpClient, "203.0.113.10", "53", "600"],
                                            logPath: log)
            defer { client.stop() }
            #expect(client.waitForLine(timeout: 10) { $0 == "OK ep1" } != nil, "\(client.log)")
            let n = agent.syncs.count
            try api.apply(Self.slice4(["198.51.100.12"]))
            #expect(agent.waitForSync(after: n) != nil)
            // The same socket now reaches the new endpoint: its conntrack entry to the old one was deleted.
            #expect(client.waitForLine(timeout: 10, after: client.lines.count) { $0 == "OK ep2" } != nil, "\(client.lines.suffix(5))")
            #expect((agent.syncs.last?["conntrack_deleted"] as? String).flatMap(Int.init).map { $0 >= 1 } == true, "\(agent.syncs.last ?? [:])")
        }
    }

    /// nftables announces every change: with a sync period of an hour, a table deleted by hand must still
    /// be back at once (the agent hears of it and repairs), and the log says who did it.
    @Test func aTableDeletedByHandIsRepairedAtOnce() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl"]) else { return }
        try withAgent(extra: ["--sync-period", "1h"]) { _, node, _, agent in
            #expect(try servers(node, count: 4) != ["failed"])
            let n = agent.syncs.count
            _ = try node.nft("delete", "table", "inet", "hostnet-dnat")
            let repaired = agent.waitForSync(after: n, timeout: 10)
            #expect(repaired?["kind"] as? String == "full", "\(agent.process.log.suffix(2000))")
            #expect(agent.records.contains { ($0["msg"] as? String)?.contains("changed by someone else") == true && "\($0)".contains("nft") })
            #expect(try eventually(timeout: 5) { try servers(node, count: 4, timeout: 0.5).isSubset(of: ["ep1", "ep2"]) })
        }
    }

    /// iptables has no notifications: the periodic full sync (2 s here) puts a flushed chain and a deleted
    /// jump back.
    @Test func iptablesRulesRemovedByHandAreRestoredWithinTheSyncPeriod() throws {
        guard try requireKernelTests(tools: ["iptables-restore", "python3", "openssl"]) else { return }
        try withAgent(backend: "iptables", extra: ["--sync-period", "2s"]) { _, node, _, agent in
            #expect(try servers(node, count: 4) != ["failed"])
            try node.runChecked(["iptables", "-t", "nat", "-F", "HOSTNET-DNAT"])
            try node.runChecked(["iptables", "-t", "nat", "-D", "OUTPUT", "-j", "HOSTNET-DNAT"])
            #expect(try servers(node, count: 2, timeout: 0.5) == ["failed"])
            #expect(try eventually(timeout: 10) { try servers(node, count: 4, timeout: 0.5).isSubset(of: ["ep1", "ep2"]) },
                    "not restored within the sync period: \(agent.process.log.suffix(2000))")
        }
    }

    /// `--target kube-proxy` jumps into kube-proxy's `KUBE-SVC-…` chains, which keeps them referenced: while
    /// our jump is there, kube-proxy's restore that deletes the chain of a deleted Service fails (for every
    /// Service on the node, as it is one transaction). The agent drops the jump on the delete event, so that
    /// restore, one --min-sync-period later, succeeds.
    @Test func aDeletedServicesJumpIsGoneBeforeKubeProxyDeletesItsChain() throws {
        guard try requireKernelTests(tools: ["iptables-restore", "ip6tables-restore", "python3", "openssl"]) else { return }
        let rendered = try CLI.run(["render", "-f", "-", "--format", "iptables", "--target", "kube-proxy"], stdin: trafficCluster)
        let chains = Set(rendered.stdout.split(separator: " ").filter { $0.hasPrefix("KUBE-SVC-") }.map { String($0.prefix(25)) })
        try #require(chains.count == 2, "\(rendered.stdout)")
        let tcp = try #require(rendered.stdout.split(separator: "\n").first { $0.contains("--dport 80") }?.split(separator: " ").last.map(String.init))
        // kube-proxy's side: KUBE-SERVICES from OUTPUT, a KUBE-SVC chain per port (a DNAT to one endpoint for IPv4).
        func kubeProxy(_ v6: Bool) -> String {
            var t = "*nat\n:KUBE-SERVICES - [0:0]\n" + chains.sorted().map { ":\($0) - [0:0]\n" }.joined()
            t += "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
            if !v6 { t += "-A \(tcp) -p tcp -j DNAT --to-destination 198.51.100.11:8080\n" }
            return t + "COMMIT\n"
        }
        let deleteChain = "*nat\n:\(tcp) - [0:0]\n-X \(tcp)\nCOMMIT\n"
        try withAgent(backend: "iptables", target: "kube-proxy", minSyncPeriod: "1s", before: { node in
            try node.runChecked(["iptables-restore", "--noflush", "-w"], input: kubeProxy(false))
            try node.runChecked(["ip6tables-restore", "--noflush", "-w"], input: kubeProxy(true))
        }) { api, node, _, agent in
            #expect(try servers(node, count: 4) == ["ep1"], "through our jump into KUBE-SVC: \(agent.process.log.suffix(1500))")
            // The test can fail: while the jump is there, kube-proxy's restore is refused and changes nothing.
            let refused = try node.run(["iptables-restore", "--noflush", "-w"], input: deleteChain)
            #expect(refused.status != 0, "kube-proxy's restore went through although our jump references \(tcp)")
            let n = agent.syncs.count
            try api.delete(kind: "Service", namespace: "test", name: "echo")
            #expect(agent.waitForSync(after: n) != nil, "\(agent.process.log.suffix(1500))")
            let accepted = try node.run(["iptables-restore", "--noflush", "-w"], input: deleteChain)
            #expect(accepted.status == 0, "\(accepted)")
            #expect(try !node.runChecked(["iptables-save", "-t", "nat"]).stdout.contains(tcp))
        }
    }

    @Test func anAPIOutageLeavesTheRulesThenTheyConverge() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl"]) else { return }
        try withAgent { api, node, _, agent in
            let before = try node.nft("list", "table", "inet", "hostnet-dnat")
            try api.post("/down")
            // While the API is down for 20 s the rules stay and keep carrying traffic.
            try api.apply(Self.slice4(["198.51.100.12"]))  // stored, not yet seen by the agent
            let downSince = Date()
            #expect(agent.process.waitForLine(timeout: 20) { $0.contains("unavailable") || $0.contains("restarted") } != nil)
            while Date().timeIntervalSince(downSince) < 20 { usleep(500_000) }
            #expect(try node.nft("list", "table", "inet", "hostnet-dnat") == before)
            #expect(try servers(node).isSubset(of: ["ep1", "ep2"]))
            let n = agent.syncs.count
            try api.post("/up")
            #expect(agent.waitForSync(after: n, timeout: 60) != nil, "\(agent.process.log.suffix(3000))")
            #expect(try servers(node) == ["ep2"])
        }
    }

    @Test func anUndecodableObjectLeavesTheOthersSynced() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl"]) else { return }
        try withAgent { api, node, _, agent in
            let n = agent.syncs.count
            try api.apply(#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"broken","namespace":"test"},"spec":5}"#)
            try api.apply(Self.service("late", lb: "203.0.113.20", port: 80, targetPort: 8080))
            try api.apply(Self.slice(for: "late", ["198.51.100.11"], port: 8080))
            #expect(agent.waitForSync(after: n) != nil)
            #expect(try eventually { try servers(node, host: "203.0.113.20", count: 4, timeout: 0.5) == ["ep1"] })
            #expect(try servers(node) == ["ep1", "ep2"])
            let errors = agent.records.filter { $0["level"] as? String == "error" }
            #expect(errors.contains { "\($0)".contains("test/broken") && "\($0)".contains("spec") }, "\(errors)")
            #expect(agent.process.exited == nil)
        }
    }

    @Test(arguments: [false, true])
    func sigtermExitsZeroLeavingOrRemovingTheRules(cleanup: Bool) throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl"]) else { return }
        try withAgent(extra: cleanup ? ["--cleanup-on-exit"] : []) { _, node, _, agent in
            let started = Date()
            #expect(agent.process.signal(SIGTERM, wait: 5) == 0, "\(agent.process.log.suffix(2000))")
            #expect(Date().timeIntervalSince(started) < 5)
            let tables = try node.nft("list", "tables")
            #expect(tables.contains("hostnet-dnat") == !cleanup, "\(tables)")
        }
    }

    @Test func aOneShotApplyOrASecondSyncWhileSyncRunsExits75() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl"]) else { return }
        try withAgent { api, node, _, agent in
            let before = try node.nft("list", "table", "inet", "hostnet-dnat")
            let apply = try CLI.run(["apply", "-f", "examples/cluster.yaml", "--netns", node.name])
            #expect(apply.status == 75, "\(apply.stderr)")
            #expect(apply.stderr.contains("hostnet-dnat sync` (pid \(agent.process.pid))"), "\(apply.stderr)")
            let remove = try CLI.run(["remove", "--netns", node.name])
            #expect(remove.status == 75, "\(remove.stderr)")
            let second = try CLI.run(["sync", "--kubeconfig", api.kubeconfig, "--netns", node.name])
            #expect(second.status == 75, "\(second.stderr)")
            #expect(try node.nft("list", "table", "inet", "hostnet-dnat") == before)
            // A dry run takes no lock.
            #expect(try CLI.run(["apply", "--dry-run", "-f", "examples/cluster.yaml", "--netns", node.name]).status == 0)
        }
    }

    @Test func aCompactedWatchRelistsAndConverges() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl"]) else { return }
        try withAgent { api, node, _, agent in
            try api.post("/compact")
            try api.post("/drop-watches")
            let n = agent.syncs.count
            try api.apply(Self.slice4(["198.51.100.11"]))
            #expect(agent.waitForSync(after: n, timeout: 30) != nil, "\(agent.process.log.suffix(2000))")
            #expect(try servers(node) == ["ep1"])
        }
    }

    /// A node agent lives for months: watches that break and lists that are taken again must not leave
    /// sockets, pipes or netlink sessions behind.
    @Test func reconnectsAndRelistsLeaveNoDescriptorsBehind() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl"]) else { return }
        try withAgent { api, node, _, agent in
            func descriptors() -> [String] {
                let dir = "/proc/\(agent.process.pid)/fd"
                return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).map { fd in
                    (try? FileManager.default.destinationOfSymbolicLink(atPath: dir + "/" + fd)) ?? "?"
                }
            }
            func settle(_ i: Int) throws {
                let n = agent.syncs.count
                try api.apply(Self.slice4(i % 2 == 0 ? ["198.51.100.11"] : ["198.51.100.12"]))
                #expect(agent.waitForSync(after: n, timeout: 30) != nil, "\(agent.process.log.suffix(2000))")
            }
            try settle(1)
            let baseline = descriptors()
            #expect(!baseline.isEmpty)
            for i in 0..<6 {
                if i % 2 == 1 { try api.post("/compact") }  // then the new watch gets a 410: a relist
                try api.post("/drop-watches")
                try settle(i)
            }
            let after = descriptors()
            // The watches really were broken and a relist happened (410 after the compaction).
            let restarts = agent.process.lines.filter { $0.contains("watch restarted") }
            #expect(restarts.count >= 6, "\(agent.process.log.suffix(2000))")
            #expect(restarts.contains { $0.contains("gone") }, "\(restarts)")
            // A connection may be between close and reopen; anything that piles up shows as several.
            #expect(after.count <= baseline.count + 2, "before: \(baseline.sorted())\nafter: \(after.sorted())")
        }
    }

    /// Answers every line on a connection with "<name> <line>", forever; one thread per connection.
    static let streamServer = #"""
    import socket, threading
    def serve(addr, name):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((addr, 9090)); s.listen(16)
        while True:
            c, _ = s.accept()
            def run(c=c):
                f = c.makefile('rwb')
                for line in f:
                    f.write(name.encode() + b' ' + line); f.flush()
            threading.Thread(target=run, daemon=True).start()
    for a, n in (('198.51.100.11', 's11'), ('198.51.100.12', 's12')):
        threading.Thread(target=serve, args=(a, n), daemon=True).start()
    print('ready', flush=True)
    threading.Event().wait()
    """#

    /// One TCP connection, one exchange every 50 ms for `count` rounds; prints OK <server> or ERR and exits 1.
    static let streamClient = #"""
    import socket, sys, time
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.create_connection((host, port), timeout=5)
    f = s.makefile('rwb')
    for i in range(count):
        try:
            f.write(b'%d\n' % i); f.flush()
            line = f.readline().decode().split()
            if len(line) != 2 or line[1] != str(i): raise Exception('bad reply %r' % line)
            print('OK ' + line[0], file=sys.stderr, flush=True)
        except Exception as e:
            print('ERR %s' % e, file=sys.stderr, flush=True); sys.exit(1)
        time.sleep(0.05)
    """#

    /// One UDP socket for its whole life, one datagram every 100 ms; prints OK <server> or ERR.
    static let udpClient = #"""
    import socket, sys, time
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
    for i in range(count):
        try:
            s.sendto(b'x', (host, port))
            data, _ = s.recvfrom(1024)
            print('OK ' + data.decode().split()[0], file=sys.stderr, flush=True)
        except Exception as e:
            print('ERR ' + type(e).__name__, file=sys.stderr, flush=True)
        time.sleep(0.1)
    """#
}

/// `sync` as operators see it: /metrics, /healthz, /readyz and its log lines.
@Suite(.serialized) struct SyncOperationsTests {
    typealias K = SyncCLIKernelTests

    /// `name{labels} value` samples of a Prometheus text exposition (comments skipped); fails on any other line.
    static func samples(_ text: String) throws -> [(name: String, labels: String, value: Double)] {
        try text.split(separator: "\n").filter { !$0.hasPrefix("#") && !$0.isEmpty }.map { line in
            let parts = line.split(separator: " ")
            guard parts.count >= 2, let value = Double(parts[1]) else { throw TestSupportError("not a sample: \(line)") }
            let head = String(parts[0])
            if let brace = head.firstIndex(of: "{") {
                return (String(head[..<brace]), String(head[brace...]), value)
            }
            return (head, "", value)
        }
    }

    static func value(_ s: [(name: String, labels: String, value: Double)], _ name: String, _ labels: String = "") -> Double? {
        s.first { $0.name == name && (labels.isEmpty || $0.labels.contains(labels)) }?.value
    }

    @Test func metricsCarryWhatTheAgentDid() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl"]) else { return }
        try K().withAgent { api, node, _, agent in
            let port = try #require(agent.port("metrics_port"), "\(agent.process.log)")
            let (status, first) = try LoopbackHTTP.get(port: port, "/metrics")
            #expect(status == 200)
            let before = try Self.samples(first)
            #expect(Self.value(before, "hostnet_dnat_mappings", "family=\"IPv4\"") == 2, "\(first)")
            #expect(Self.value(before, "hostnet_dnat_mappings", "family=\"IPv6\"") == 2)
            #expect(Self.value(before, "hostnet_dnat_skipped", "reason=\"no_ready_endpoints\"") == 0)
            let fullCount = Self.value(before, "hostnet_dnat_sync_duration_seconds_count", "kind=\"full\"") ?? 0
            #expect(fullCount >= 1)
            #expect((Self.value(before, "hostnet_dnat_last_successful_sync_timestamp_seconds") ?? 0) > Date().timeIntervalSince1970 - 120)
            // An annotated slice change: the programming latency is measured from its trigger time.
            let trigger = ISO8601DateFormatter().string(from: Date().addingTimeInterval(-3))
            let n = agent.syncs.count
            try api.apply(K.slice4(["198.51.100.12"]).replacingOccurrences(
                of: #""namespace":"test","labels""#,
                with: #""namespace":"test","annotations":{"endpoints.kubernetes.io/last-change-trigger-time":"\#(trigger)"},"labels""#))
            #expect(agent.waitForSync(after: n) != nil)
            let after = try Self.samples(try LoopbackHTTP.get(port: port, "/metrics").1)
            #expect((Self.value(after, "hostnet_dnat_sync_duration_seconds_count", "kind=\"partial\"") ?? 0) >= 1)
            #expect((Self.value(after, "hostnet_dnat_network_programming_duration_seconds_count") ?? 0) >= 1)
            // At least 3 s: the trigger time was 3 s before the change reached the API.
            let sum = Self.value(after, "hostnet_dnat_network_programming_duration_seconds_sum") ?? 0
            #expect(sum >= 3 && sum < 60, "sum \(sum)")
            #expect(Self.value(after, "process_resident_memory_bytes").map { $0 > 1_000_000 } == true)
            // Every sync logged one JSON line with the stated fields.
            for line in agent.syncs {
                for key in ["time", "level", "msg", "kind", "duration_ms", "added", "removed"] {
                    #expect(line[key] != nil, "\(key) missing in \(line)")
                }
            }
            #expect(try LoopbackHTTP.get(port: port, "/nothing").0 == 404)
        }
    }

    @Test func healthTurnsBadWhenTheAPIIsGoneAndGoodWhenItIsBack() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl"]) else { return }
        try K().withAgent(extra: ["--sync-period", "1s"]) { api, _, _, agent in
            let port = try #require(agent.port("healthz_port"), "\(agent.process.log)")
            #expect(try LoopbackHTTP.get(port: port, "/readyz").0 == 200)
            #expect(try K().eventually { try LoopbackHTTP.get(port: port, "/healthz").0 == 200 })
            try api.post("/down")
            #expect(try K().eventually(timeout: 15) { try LoopbackHTTP.get(port: port, "/healthz").0 == 503 })
            let (_, body) = try LoopbackHTTP.get(port: port, "/healthz")
            #expect(body.contains("lastUpdated"), "\(body)")
            try api.post("/up")
            #expect(try K().eventually(timeout: 30) { try LoopbackHTTP.get(port: port, "/healthz").0 == 200 },
                    "\(agent.process.log.suffix(2000))")
        }
    }

    @Test func notReadyBeforeTheFirstSync() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl"]) else { return }
        try withNamespace("notready") { node in
            try FakeKubeAPI.with(data: trafficCluster) { api in
                try api.post("/down")
                let agent = try K.Agent(api: api, node: node, backend: "nftables")
                defer { agent.process.stop() }
                let port = try #require(agent.port("healthz_port"), "\(agent.process.log)")
                #expect(try LoopbackHTTP.get(port: port, "/readyz").0 == 503)
                #expect(try node.nft("list", "tables").isEmpty, "rules before both lists")
                try api.post("/up")
                #expect(try K().eventually(timeout: 30) { try LoopbackHTTP.get(port: port, "/readyz").0 == 200 })
            }
        }
    }

    @Test func bindErrorsExitAsDocumented() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "openssl"]) else { return }
        try withNamespace("bind") { node in
            try FakeKubeAPI.with(data: trafficCluster) { api in
                let base = ["sync", "--kubeconfig", api.kubeconfig, "--netns", node.name, "--metrics-bind-address", "0"]
                let malformed = try CLI.run(base + ["--healthz-bind-address", "localhost"])
                #expect(malformed.status == 64, "\(malformed.stderr)")
                // The fake API's own port is taken.
                let taken = try CLI.run(base + ["--healthz-bind-address", "127.0.0.1:\(api.apiPort)"])
                #expect(taken.status == 69, "\(taken.stderr)")
                #expect(taken.stderr.contains("\(api.apiPort)"))
                #expect(try node.nft("list", "tables").isEmpty)
            }
        }
    }
}
