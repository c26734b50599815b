import Foundation
import NetAddress
@testable import NetlinkBackend
import RulePlanning
import Testing
import TestSupport

/// What the kernel answers (table dumps, batch acks and errors, change notifications, conntrack dumps),
/// recorded from the socket in throwaway namespaces and replayed through the decoders without a socket
/// (`NetlinkReplay`, the fuzz targets' driver): the replay must decode what the live read decoded, and that
/// must be what the plan says. With `HND_WRITE_FUZZ_CORPUS=<dir>` the recordings are also written to
/// `<dir>/netlink/` and `<dir>/conntrack/`: the seed corpus in Tests/Fuzz/corpus was made that way.
@Suite("kernel answers recorded and replayed", .serialized)
struct KernelReplyRecordingTests {
    /// The fuzz target reads this table.
    static let table = "hostnet-dnat"

    static func save(_ target: String, _ name: String, _ datagrams: [[UInt8]]) throws {
        guard let dir = ProcessInfo.processInfo.environment["HND_WRITE_FUZZ_CORPUS"], !dir.isEmpty else { return }
        let folder = URL(fileURLWithPath: dir).appendingPathComponent(target)
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        try Data(NetlinkReplay.recording(datagrams)).write(to: folder.appendingPathComponent(name))
    }

    /// A session whose socket records every datagram it receives.
    final class Recorder {
        var datagrams: [[UInt8]] = []
        func attach(_ socket: NetlinkSocket) { socket.tap = { [unowned self] in self.datagrams.append($0) } }
    }

    static func plans() throws -> [(String, RulePlan)] {
        [("dump-sample", try Fixtures.samplePlan(table: table)),
         ("dump-ranges-affinity", try Fixtures.mixedPolicyPlan(Fixtures.sample, settings: PlanSettings(table: table))),
         ("dump-no-masquerade", try Fixtures.samplePlan(table: table, priority: -101, masquerade: false))]
    }

    @Test("a table dump replays to what read(table:) decoded and the plan says; a missing table to nil")
    func tableDumps() throws {
        guard try requireKernelTests() else { return }
        for (name, plan) in try Self.plans() {
            try withNamespace("rec-dump") { ns in
                var session = try NetlinkSession.open(in: ns.netns)
                let recorder = Recorder()
                recorder.attach(session.socket)
                let missing = try NftablesNetlink.dumpTable(family: .inet, name: Self.table, on: &session)
                #expect(missing == nil)
                #expect(try NetlinkReplay.readTable(recorder.datagrams, family: .inet, name: Self.table) == nil)
                try Self.save("netlink", "dump-missing-table", recorder.datagrams)

                try ns.backend.apply(plan)
                recorder.datagrams = []
                let live = try #require(try NftablesNetlink.dumpTable(family: .inet, name: Self.table, on: &session))
                let replayed = try #require(try NetlinkReplay.readTable(recorder.datagrams, family: .inet, name: Self.table))
                #expect(RulesetDecoder.decode(replayed) == RulesetDecoder.decode(live))
                #expect(RulesetDecoder.decode(replayed) == NftablesNetlink.expected(plan))
                #expect(replayed.rules.count == live.rules.count && replayed.elements == live.elements)
                // Several datagrams: the dumps are multi-part.
                #expect(recorder.datagrams.count > 6)
                try Self.save("netlink", name, recorder.datagrams)
            }
        }
    }

    @Test("a table another tool changed: the replay reports the same anomalies")
    func tamperedDump() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        let plan = try Fixtures.mixedPolicyPlan(Fixtures.sample, settings: PlanSettings(table: Self.table))
        try withNamespace("rec-tampered") { ns in
            try ns.backend.apply(plan)
            // Expressions we never write (counter, log, limit, reject), an odd set, a foreign element.
            try ns.nftScript("""
                add chain inet \(Self.table) extra
                add rule inet \(Self.table) extra ip saddr 192.0.2.0/24 counter log prefix "x" limit rate 5/second reject
                add set inet \(Self.table) odd { type ipv4_addr . inet_service; flags interval; }
                add element inet \(Self.table) odd { 192.0.2.1-192.0.2.9 . 80-90 }
                add element inet \(Self.table) masquerade4 { 192.0.2.77 }
                """)
            var session = try NetlinkSession.open(in: ns.netns)
            let recorder = Recorder()
            recorder.attach(session.socket)
            let live = try #require(try NftablesNetlink.dumpTable(family: .inet, name: Self.table, on: &session))
            let replayed = try #require(try NetlinkReplay.readTable(recorder.datagrams, family: .inet, name: Self.table))
            let decoded = RulesetDecoder.decode(replayed)
            #expect(decoded == RulesetDecoder.decode(live))
            #expect(decoded.anomalies.contains("unexpected set odd"))
            #expect(decoded.anomalies.contains { $0.hasPrefix("chain extra:") })
            try Self.save("netlink", "dump-tampered", recorder.datagrams)
        }
    }

    @Test("batch acks replay to the same result; a refused batch to the same error, named by its element")
    func batchAnswers() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        let old = try Fixtures.samplePlan(table: Self.table)
        let new = try Fixtures.plan(Fixtures.sample.filter { $0.name != "api" }, settings: PlanSettings(table: Self.table))
        try withNamespace("rec-acks") { ns in
            try ns.backend.apply(old)
            var session = try NetlinkSession.open(in: ns.netns)
            let recorder = Recorder()
            recorder.attach(session.socket)
            let forward = try #require(try RulesetProgram.changes(from: old, to: new))
            let report = try NftablesNetlink.commitChanges(new, operations: forward, on: &session, start: Date())
            let replayed = try NetlinkReplay.commit(NetlinkBatch(forward), beginSequence: NetlinkReplay.Feed(recorder.datagrams).sequence &- 1,
                                                    recorder.datagrams)
            #expect(replayed.messages == report.messages && replayed.bytes == report.bytes)
            try Self.save("netlink", "acks-update", recorder.datagrams)

            // An element of `old` added back behind our back: the update back to `old` is refused (EEXIST).
            try ns.nftScript("add element inet \(Self.table) dispatch4 { 203.0.113.12 . tcp . 8000 : goto pick4-tcp-2 }")
            recorder.datagrams = []
            let back = try #require(try RulesetProgram.changes(from: new, to: old))
            var live: NetlinkError?
            do throws(NetlinkError) { _ = try NftablesNetlink.commitChanges(old, operations: back, on: &session, start: Date()) } catch { live = error }
            let liveError = try #require(live)
            #expect(liveError.errno == 17 && liveError.isOutOfSync)
            var replayedError: NetlinkError?
            do throws(NetlinkError) {
                _ = try NetlinkReplay.commit(NetlinkBatch(back), beginSequence: NetlinkReplay.Feed(recorder.datagrams).sequence &- 1,
                                             recorder.datagrams)
            } catch { replayedError = error }
            #expect(replayedError?.description == liveError.description)
            #expect(liveError.description.contains("203.0.113.12 . tcp . 8000"), "\(liveError)")
            try Self.save("netlink", "acks-refused-eexist", recorder.datagrams)
        }
    }

    @Test("notifications replay to the same changes: another socket's commit is reported, our own is not")
    func notifications() throws {
        guard try requireKernelTests() else { return }
        let plan = try Fixtures.mixedPolicyPlan(Fixtures.sample, settings: PlanSettings(table: Self.table))
        try withNamespace("rec-notify") { ns in
            let listener = try ns.netns.run { try NetlinkSocket() }
            try listener.joinNftablesNotifications()
            listener.raiseBuffers(send: 1 << 16, receive: 8 << 20)
            var session = try NetlinkSession.open(in: ns.netns)
            _ = try NftablesNetlink.apply(plan, operations: try RulesetProgram.operations(plan), on: &session, start: Date())
            _ = try NftablesNetlink.remove(table: Self.table, on: &session)
            var datagrams: [[UInt8]] = []
            while let d = try listener.receive(timeoutMilliseconds: 200) { datagrams.append(d) }
            let port = session.socket.portID
            var others = NftChangeFilter(table: Self.table, isOwnPort: { _ in false })
            var ours = NftChangeFilter(table: Self.table, isOwnPort: { $0 == port })
            let seen = datagrams.flatMap { others.consume(datagram: $0) }
            #expect(seen.count == 2, "\(seen)")  // the apply and the remove
            #expect(datagrams.flatMap { ours.consume(datagram: $0) }.isEmpty)
            // The largest datagrams are what the fuzzer gets: a whole transaction of element announcements.
            try Self.save("netlink", "notifications-apply-remove", datagrams)
        }
    }

    @Test("a conntrack dump replays to the same entries")
    func conntrackDump() throws {
        guard try requireKernelTests(tools: ["conntrack"]) else { return }
        try withNamespace("rec-ct") { ns in
            // A DNATed UDP flow, an untranslated one, a TCP one, and their IPv6 twins.
            for (src, dst, endpoint) in [("198.51.100.1", "203.0.113.53", "198.51.100.5"), ("2001:db8:2::1", "2001:db8:e::53", "2001:db8:2::5")] {
                _ = try ns.runChecked(["conntrack", "-I", "-p", "udp", "-s", src, "-d", dst, "--sport", "40000", "--dport", "53",
                                       "--reply-src", endpoint, "--reply-dst", src, "--reply-port-src", "5300", "--reply-port-dst", "40000",
                                       "-t", "120"])
                _ = try ns.runChecked(["conntrack", "-I", "-p", "udp", "-s", src, "-d", dst, "--sport", "40001", "--dport", "53", "-t", "120"])
                _ = try ns.runChecked(["conntrack", "-I", "-p", "tcp", "-s", src, "-d", dst, "--sport", "40002", "--dport", "443",
                                       "--state", "ESTABLISHED", "-u", "SEEN_REPLY", "-t", "120"])
            }
            for family in IPFamily.allCases {
                var session = try ConntrackSession.open(in: ns.netns)
                var datagrams: [[UInt8]] = []
                session.socket.tap = { datagrams.append($0) }
                var live: [ConntrackEntry] = []
                let scanned = try session.dump(family: family, protocolNumber: nil) { live.append($0) }
                #expect(scanned == 3 && live.count == 3)
                var replayed: [ConntrackEntry] = []
                let (end, replayScanned) = NetlinkReplay.conntrackDump(datagrams) { replayed.append($0) }
                #expect(end == .finished && replayScanned == scanned)
                #expect(replayed == live)
                #expect(live.contains { $0.reply.source != $0.original.destination })  // the DNATed one
                try Self.save("conntrack", "dump-\(family == .ipv4 ? "ipv4" : "ipv6")", datagrams)
            }
        }
    }
}
