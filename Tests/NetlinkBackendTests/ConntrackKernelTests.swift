import Foundation
import NetAddress
@testable import NetlinkBackend
import RulePlanning
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// UDP clients that keep their socket across rule changes, in throwaway namespaces; every conntrack count is
/// checked with the `conntrack` tool as well as with our own dump.
@Suite("conntrack cleanup in network namespaces", .serialized)
struct ConntrackKernelTests {
    static let table = "hnd-test"

    struct Addresses {
        let ipv6: Bool
        var ext: String { ipv6 ? "2001:db8:e::53" : "203.0.113.53" }
        /// A UDP mapping no step changes, to the same endpoint E1: its entry must survive every cleanup.
        var steady: String { ipv6 ? "2001:db8:e::54" : "203.0.113.54" }
        /// A TCP mapping present from the start, so that the nat hooks (and conntrack) are active in the node
        /// namespace before the UDP mapping exists.
        var web: String { ipv6 ? "2001:db8:e::80" : "203.0.113.80" }
        var e1: String { ipv6 ? "2001:db8:2::5" : "198.51.100.5" }
        var e2: String { ipv6 ? "2001:db8:2::6" : "198.51.100.6" }

        func plan(dns endpoints: [String]?) throws -> RulePlan {
            func spec(_ name: String, _ ip: String, _ proto: TransportProtocol, _ port: Int, _ eps: [String]) -> ServiceSpec {
                ServiceSpec(name: name, ips: [ip], ports: [(name, proto, port, proto == .udp ? 5300 : 8080)],
                            endpoints4: ipv6 ? [] : eps, endpoints6: ipv6 ? eps : [])
            }
            var specs = [spec("web", web, .tcp, 80, [e1]), spec("steady", steady, .udp, 53, [e1])]
            if let endpoints { specs.append(spec("dns", ext, .udp, 53, endpoints)) }
            return try Fixtures.plan(specs, settings: PlanSettings(table: ConntrackKernelTests.table))
        }
    }

    /// Node (198.51.100.1, 2001:db8:2::1) and a peer holding E1 and E2 with UDP echo servers on port 5300.
    /// The node's default route points at the peer, which does not forward: a datagram to an external IP
    /// that nothing translates leaves an (unreplied) entry and gets no answer.
    static func withTopology(_ label: String, _ a: Addresses, _ body: (TestNamespace) throws -> Void) throws {
        try withNamespaces(2, label: label) { ns in
            let (node, peer) = (ns[0], ns[1])
            try connect(node, peer, aAddresses: ["198.51.100.1/24", "2001:db8:2::1/64"], bAddresses: ["198.51.100.5/24", "2001:db8:2::5/64"])
            try addAddresses(peer, ["198.51.100.6/24", "2001:db8:2::6/64"])
            try withEchoServers([(peer, .udp, a.e1, 5300, "e1"), (peer, .udp, a.e2, 5300, "e2")]) { _ in try body(node) }
        }
    }

    @Test("the same UDP socket follows the mapping: appears, endpoint replaced, disappears", arguments: [false, true])
    func sameSocketFollowsTheMapping(ipv6: Bool) throws {
        guard try requireKernelTests(tools: ["python3", "conntrack", "nft"]) else { return }
        let a = Addresses(ipv6: ipv6)
        let (none, toE1, toE2) = (try a.plan(dns: nil), try a.plan(dns: [a.e1]), try a.plan(dns: [a.e2]))
        try Self.withTopology("ct-socket", a) { node in
            try node.backend.apply(none)
            let conntrack = ConntrackTable(namespace: node.netns)
            let client = try PersistentUDPClient(in: node, host: a.ext, port: 53)
            let bystander = try PersistentUDPClient(in: node, host: a.steady, port: 53)
            defer { client.stop(); bystander.stop() }
            #expect(try bystander.send().server == "e1")
            let bystanderEntry = try #require(try conntrack.entries().first { $0.original.destination.description == a.steady })

            // 1. No mapping yet: the datagram goes towards the "load balancer" and nobody answers.
            #expect(try client.send(timeout: 1).server == nil)
            #expect(try conntrackTool(node, ipv6, origDst: a.ext, replySrc: a.ext).count == 1)

            // 2. The mapping appears. The untranslated entry keeps the socket away from it until deleted.
            try node.backend.apply(toE1)
            #expect(try client.send(timeout: 1).server == nil, "the old entry should still bypass the new mapping")
            let untranslated = try conntrackTool(node, ipv6, origDst: a.ext, replySrc: a.ext).count
            var report = try conntrack.delete(ConntrackCleanup.deletions(from: none, to: toE1))
            #expect(report.deleted == untranslated && untranslated == 1, "\(report)")
            #expect(report.dumps == 1 && !report.incomplete)
            #expect(try conntrackTool(node, ipv6, origDst: a.ext).isEmpty)
            #expect(try client.send().server == "e1")

            // 3. E1 is replaced by E2. Without a delete the same socket keeps reaching E1.
            try node.backend.apply(toE2)
            #expect(try client.send().server == "e1", "without the delete the socket should still reach E1")
            let stale = try conntrackTool(node, ipv6, origDst: a.ext, replySrc: a.e1).count
            report = try conntrack.delete(ConntrackCleanup.deletions(from: toE1, to: toE2))
            #expect(report.deleted == stale && stale == 1, "\(report)")
            #expect(try conntrackTool(node, ipv6, origDst: a.ext, replySrc: a.e1).isEmpty)
            #expect(try client.send().server == "e2")
            #expect(try conntrackTool(node, ipv6, origDst: a.ext, replySrc: a.e2).count == 1)

            // 4. The mapping disappears: the socket's entry to E2 goes, its traffic goes where an unmapped IP goes.
            try node.backend.apply(none)
            #expect(try client.send().server == "e2", "without the delete the socket should still reach E2")
            report = try conntrack.cleanUp(from: toE2, to: none)
            #expect(report.deleted == 1, "\(report)")
            #expect(try client.send(timeout: 1).server == nil)
            #expect(try conntrackTool(node, ipv6, origDst: a.ext, replySrc: a.ext).count == 1)

            // The bystander (same endpoint E1, another external IP) kept its very entry through all of it.
            #expect(try conntrackTool(node, ipv6, origDst: a.steady, replySrc: a.e1).count == 1)
            #expect(try conntrack.entries().first { $0.original.destination.description == a.steady }?.id == bystanderEntry.id)
            #expect(try bystander.send().server == "e1")

            // Our dump and the conntrack tool list the same entries.
            let ours = Set(try conntrack.entries(family: ipv6 ? .ipv6 : .ipv4).map(\.withoutIdentity))
            let tool = Set(try conntrackTool(node, ipv6))
            #expect(ours == tool && ours.count == 2)
        }
    }

    @Test("deleteStale(for:) without the previous plan: the stale entry goes, the bystander's stays", arguments: [false, true])
    func reconcile(ipv6: Bool) throws {
        guard try requireKernelTests(tools: ["python3", "conntrack", "nft"]) else { return }
        let a = Addresses(ipv6: ipv6)
        let (toE1, toE2) = (try a.plan(dns: [a.e1]), try a.plan(dns: [a.e2]))
        try Self.withTopology("ct-stale", a) { node in
            try node.backend.apply(toE1)
            let client = try PersistentUDPClient(in: node, host: a.ext, port: 53)
            let bystander = try PersistentUDPClient(in: node, host: a.steady, port: 53)
            defer { client.stop(); bystander.stop() }
            #expect(try client.send().server == "e1")
            #expect(try bystander.send().server == "e1")
            try node.backend.apply(toE2)
            #expect(try client.send().server == "e1")
            let conntrack = ConntrackTable(namespace: node.netns)
            #expect(try conntrack.deleteStale(for: toE1).deleted == 0)  // nothing is stale for the plan it was made with
            let report = try conntrack.deleteStale(for: toE2)
            #expect(report.deleted == 1 && report.scanned == 2, "\(report)")
            #expect(try conntrackTool(node, ipv6, origDst: a.ext).isEmpty)
            #expect(try conntrackTool(node, ipv6, origDst: a.steady, replySrc: a.e1).count == 1)
            #expect(try client.send().server == "e2")
            #expect(try bystander.send().server == "e1")
            #expect(try conntrack.deleteStale(for: toE2) == { var r = ConntrackDeletionReport(); r.scanned = 2; r.dumps = 1; return r }())
        }
    }

    @Test("more matches than one round holds: several dumps; a bounded call says it is incomplete; the kernel filters by protocol")
    func rounds() throws {
        guard try requireKernelTests(tools: ["python3", "conntrack", "nft"]) else { return }
        let a = Addresses(ipv6: false)
        let (none, toE1) = (try a.plan(dns: nil), try a.plan(dns: [a.e1]))
        try Self.withTopology("ct-rounds", a) { node in
            try node.backend.apply(none)
            // 25 sockets to the unmapped external IP (25 untranslated entries), one TCP attempt, one steady flow.
            _ = try exchange(from: node, .udp, host: a.ext, port: 53, count: 25, timeout: 0.05)
            _ = try exchange(from: node, .tcp, host: "203.0.113.99", port: 80, count: 1, timeout: 0.2)
            #expect(try exchange(from: node, .udp, host: a.steady, port: 53).first?.server == "e1")
            #expect(try conntrackTool(node, false, origDst: a.ext).count == 25)
            let udp = try conntrackTool(node, false).filter { $0.original.protocolNumber == 17 }.count
            #expect(udp == 26)
            #expect(try conntrackTool(node, false, proto: nil).count == 27)

            try node.backend.apply(toE1)
            let deletions = ConntrackCleanup.deletions(from: none, to: toE1)
            let bounded = ConntrackTable(namespace: node.netns, maximumMatchesPerDump: 10, maximumRounds: 2)
            let first = try bounded.delete(deletions)
            #expect(first.deleted == 20 && first.dumps == 2 && first.incomplete, "\(first)")
            // The kernel sent only UDP entries (CTA_FILTER): the TCP entry was never scanned.
            #expect(first.scanned == 26 + 16, "\(first)")
            #expect(try conntrackTool(node, false, origDst: a.ext).count == 5)
            let rest = try ConntrackTable(namespace: node.netns, maximumMatchesPerDump: 10, maximumRounds: 8).delete(deletions)
            #expect(rest.deleted == 5 && rest.dumps == 1 && !rest.incomplete, "\(rest)")
            #expect(try conntrackTool(node, false, origDst: a.ext).isEmpty)
            #expect(try ConntrackTable(namespace: node.netns).delete(deletions) == {
                var r = ConntrackDeletionReport(); r.scanned = 1; r.dumps = 1; return r
            }())

            // All protocols through our dump = all through the tool (the TCP entry included).
            let ours = Set(try ConntrackTable(namespace: node.netns).entries(family: .ipv4, protocol: nil).map(\.withoutIdentity))
            #expect(ours == Set(try conntrackTool(node, false, proto: nil)))
            #expect(ours.contains { $0.original.protocolNumber == 6 })
        }
    }

    /// `CONNTRACK_TEST_ENTRIES` (default 20,000) bystander entries; the time of the delete is printed.
    @Test("a table of many datagrams: every entry is read (as the conntrack tool lists them) and only the matching ones go")
    func largeTable() throws {
        guard try requireKernelTests(tools: ["python3", "conntrack", "nft"]) else { return }
        let a = Addresses(ipv6: false)
        let (none, toE1) = (try a.plan(dns: nil), try a.plan(dns: [a.e1]))
        let count = ProcessInfo.processInfo.environment["CONNTRACK_TEST_ENTRIES"].flatMap { Int($0) } ?? 20_000
        try Self.withTopology("ct-large", a) { node in
            try node.backend.apply(none)
            // A socket per 50,000 of `count` other ports of the unmapped external IP, then three sockets to port 53.
            let script = """
            import socket, sys
            host, count = sys.argv[1], int(sys.argv[2])
            for i in range(count):
                if i % 50000 == 0:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.sendto(b'x', (host, 10000 + i % 50000))
            for _ in range(3):
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', (host, 53))
            """
            try node.runChecked(["python3", "-c", script, a.ext, String(count)], timeout: 120)
            // (`conntrack -C`: the namespace's count, without listing it into this process before the measurement.)
            #expect(try node.runChecked(["conntrack", "-C"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines) == String(count + 3))

            // Streamed: the delete keeps only the 3 matches, not the table (peak RSS measured before `entries`).
            try node.backend.apply(toE1)
            let conntrack = ConntrackTable(namespace: node.netns)
            let hwm = peakResidentKiB()
            let start = Date()
            let report = try conntrack.delete(ConntrackCleanup.deletions(from: none, to: toE1))
            let seconds = Date().timeIntervalSince(start)
            let grown = peakResidentKiB() - hwm
            #expect(report.deleted == 3 && report.scanned == count + 3 && report.dumps == 1, "\(report)")
            let listed = try conntrackTool(node, false)
            #expect(listed.count == count && !listed.contains { $0.original.destinationPort == 53 })
            let ours = try conntrack.entries(family: .ipv4, limit: count + 100)
            #expect(Set(ours.map(\.withoutIdentity)) == Set(listed))
            #expect(try conntrack.entries(family: .ipv4, limit: 7).count == 7)
            print(String(format: "conntrack delete over %d entries: %.3f s, peak RSS +%d KiB", count + 3, seconds, grown))
        }
    }

    @Test("no deletions: nothing is sent; a missing namespace is a namespace error")
    func edges() throws {
        guard try requireKernelTests() else { return }
        #expect(try ConntrackTable(namespace: NetworkNamespace(path: "/nonexistent/ns")).delete([]) == ConntrackDeletionReport())
        let d = ConntrackDeletion(externalIP: IPAddress("203.0.113.53")!, port: 53, protocol: .udp, replySource: nil, replySourcePort: nil,
                                  reason: .mappingAdded, service: .init(namespace: "a", name: "b"))
        #expect(throws: NetlinkError.self) { try ConntrackTable(namespace: NetworkNamespace(path: "/nonexistent/ns")).delete([d]) }
        do {
            _ = try ConntrackTable(namespace: NetworkNamespace(path: "/nonexistent/ns")).delete([d])
        } catch {
            #expect(error.kind == .namespace)
        }
    }
}

extension ConntrackEntry {
    /// The tuples only (the conntrack tool's default listing shows neither id nor zone 0).
    var withoutIdentity: ConntrackEntry { ConntrackEntry(original: original, reply: reply) }
}

/// `conntrack -L` in the namespace, parsed: the independent view of the table.
func conntrackTool(_ ns: TestNamespace, _ ipv6: Bool, proto: String? = "udp", origDst: String? = nil, replySrc: String? = nil) throws -> [ConntrackEntry] {
    var args = ["conntrack", "-L", "-f", ipv6 ? "ipv6" : "ipv4"]
    if let proto { args += ["-p", proto] }
    if let origDst { args += ["--orig-dst", origDst] }
    if let replySrc { args += ["--reply-src", replySrc] }
    let r = try ns.runChecked(args)
    return try r.stdout.split(separator: "\n").map { line -> ConntrackEntry in
        let words = line.split(separator: " ")
        let number = words.count > 1 ? UInt8(words[1]) : nil
        var values: [String: [String]] = [:]
        for w in words {
            let kv = w.split(separator: "=", maxSplits: 1)
            if kv.count == 2 { values[String(kv[0]), default: []].append(String(kv[1])) }
        }
        func tuple(_ i: Int) throws -> ConntrackTuple {
            guard let number, let s = values["src"]?[safe: i].flatMap(IPAddress.init), let d = values["dst"]?[safe: i].flatMap(IPAddress.init) else {
                throw TestSupportError("cannot parse conntrack line: \(line)")
            }
            return ConntrackTuple(source: s, destination: d, protocolNumber: number,
                                  sourcePort: values["sport"]?[safe: i].flatMap { Int($0) }, destinationPort: values["dport"]?[safe: i].flatMap { Int($0) })
        }
        return ConntrackEntry(original: try tuple(0), reply: try tuple(1))
    }
}

extension Array {
    subscript(safe i: Int) -> Element? { indices.contains(i) ? self[i] : nil }
}

/// One UDP socket kept open for the client's whole life, as a DNS resolver keeps its socket: every `send`
/// sends a datagram on it and waits for the matching answer. (A python3 process in the namespace, driven
/// line by line over stdin / stdout.)
final class PersistentUDPClient {
    private static let script = #"""
import select, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind(('::' if fam == socket.AF_INET6 else '0.0.0.0', 0))
print('ready %d' % s.getsockname()[1], flush=True)
for line in sys.stdin:
    msg, timeout = line.split()
    s.sendto(msg.encode(), (host, port))
    deadline = time.monotonic() + float(timeout)
    answer = 'ERR timeout'
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        try:
            data = s.recv(65536).decode(errors='replace')
        except OSError as e:
            answer = 'ERR ' + type(e).__name__
            break
        if data.endswith(' ' + msg):
            answer = 'OK ' + data
            break
    print(answer, flush=True)
"""#

    /// The answering server's name, or nil and why not.
    struct Reply: CustomStringConvertible {
        var server: String?
        var error: String?
        var description: String { server ?? "error \(error ?? "?")" }
    }

    private let process: LineProcess
    private var counter = 0
    /// The socket's local port.
    private(set) var localPort = 0

    init(in ns: TestNamespace, host: String, port: Int) throws {
        let (exe, args) = try ns.wrap(["python3", "-c", Self.script, host, String(port)])
        process = try LineProcess(exe, args, name: "UDP client")
        let ready = try process.readLine(timeout: 10)
        guard ready.hasPrefix("ready "), let p = Int(ready.dropFirst(6)) else { throw TestSupportError("UDP client did not start: \(ready)") }
        localPort = p
    }

    /// Sends one datagram on the kept socket; the reply's server name, or an error after `timeout` seconds.
    func send(timeout: Double = 3) throws -> Reply {
        counter += 1
        try process.send("ping\(counter) \(timeout)")
        let line = try process.readLine(timeout: timeout + 5)
        if line.hasPrefix("OK ") {
            return Reply(server: line.dropFirst(3).split(separator: " ").first.map(String.init), error: nil)
        }
        return Reply(server: nil, error: String(line.dropFirst(4)))
    }

    func stop() { process.stop() }
}

/// VmHWM of this process, in KiB (0 when unknown).
func peakResidentKiB() -> Int {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
          let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }) else { return 0 }
    return Int(line.split(separator: " ")[1]) ?? 0
}
