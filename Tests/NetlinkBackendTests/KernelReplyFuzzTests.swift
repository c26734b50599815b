import Foundation
import NetAddress
@testable import NetlinkBackend
import RulePlanning
import Testing

/// What the kernel sends back, when it is not what a kernel sends: inputs the netlink and conntrack fuzz
/// targets (Tests/Fuzz) found crashing or reading out of bounds, each fed to the decoder that failed; and the
/// committed seed corpus, replayed through the same code the targets run. No kernel needed.
@Suite("kernel replies: hostile input")
struct KernelReplyFuzzTests {
    static func le16(_ v: UInt16) -> [UInt8] { [UInt8(v & 0xff), UInt8(v >> 8)] }
    static func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(v >> (8 * $0) & 0xff) } }

    /// One netlink message (host order is little-endian on every machine this runs on; checked below).
    static func message(type: UInt16, flags: UInt16 = 0, seq: UInt32 = 7, payload: [UInt8]) -> [UInt8] {
        le32(UInt32(16 + payload.count)) + le16(type) + le16(flags) + le32(seq) + le32(0) + payload
    }

    static func attribute(_ type: UInt16, _ value: [UInt8]) -> [UInt8] {
        let a = le16(UInt16(4 + value.count)) + le16(type) + value
        return a + [UInt8](repeating: 0, count: NetlinkWire.align4(a.count) - a.count)
    }

    /// An NLMSG_ERROR with `code`, echoing a 16-byte request header of sequence `seq`.
    static func error(_ code: Int32, seq: UInt32 = 7) -> [UInt8] {
        message(type: NetlinkWire.nlmsgError, flags: 0x100, seq: seq,
                payload: le32(UInt32(bitPattern: code)) + message(type: 0x0a01, seq: seq, payload: []))
    }

    @Test("the helpers write host order")
    func hostOrder() { #expect(UInt32(1).littleEndian == 1) }

    @Test("an NLMSG_ERROR whose code is no negative errno (Int32.min trapped on negation) is EIO")
    func errorCodeOutOfRange() throws {
        for code in [Int32.min, Int32.min + 1, -4096, 1, Int32.max] {
            let m = Self.error(code)
            let h = try #require(NetlinkParse.messages(in: m).first)
            #expect(NetlinkParse.ack(h, in: m)?.errno == 5)
            var collector = NetlinkReplyCollector(sequence: 7, dump: true)
            guard case .error(let e)? = try collector.consume(m) else { Issue.record("no error for \(code)"); continue }
            #expect(e == 5)
            var answers = BatchAnswers(NetlinkBatch([]).encode(beginSequence: 7))
            answers.consume(m)
            #expect(answers.failures.map(\.ack.errno) == [5])
            #expect(NetlinkReplay.conntrackDump([m]) { _ in } == (.failed(5), 0))
        }
        // A real errno is still itself.
        var collector = NetlinkReplyCollector(sequence: 7, dump: false)
        guard case .error(2)? = try collector.consume(Self.error(-2)) else { Issue.record("ENOENT lost"); return }
    }

    @Test("a conntrack dump whose NLMSG_DONE carries Int32.min (trapped on negation) fails with EIO")
    func conntrackDoneOutOfRange() {
        let done = { (r: Int32) in Self.message(type: NetlinkWire.nlmsgDone, flags: 2, payload: Self.le32(UInt32(bitPattern: r))) }
        #expect(NetlinkReplay.conntrackDump([done(Int32.min)]) { _ in } == (.failed(5), 0))
        #expect(NetlinkReplay.conntrackDump([done(-4096)]) { _ in } == (.failed(5), 0))
        #expect(NetlinkReplay.conntrackDump([done(-16)]) { _ in } == (.failed(16), 0))
        #expect(NetlinkReplay.conntrackDump([done(0)]) { _ in } == (.finished, 0))
    }

    @Test("an unterminated string attribute is read up to the end of its message, not past it (libnftnl strdups it)")
    func unterminatedString() throws {
        // NEWTABLE, family inet, NFTA_TABLE_NAME "abcd" without its NUL, as the last attribute; then bytes of
        // the same datagram that belong to no message.
        let m = Self.message(type: NftMessageType.subsystemShift | NftMessageType.newTable,
                             payload: [NftFamily.inet.rawValue, 0, 0, 0] + Self.attribute(1, Array("abcd".utf8)))
        let datagram = m + Array("XYZ\0".utf8)
        let h = try #require(NetlinkParse.messages(in: datagram).first)
        #expect(NftDecoder.table(datagram, h)?.name == "abcd")
    }

    @Test("a message too short for its nfgenmsg is not handed to libnftnl")
    func shortMessage() throws {
        let m = Self.message(type: NftMessageType.subsystemShift | NftMessageType.newSetElem, payload: [])
        let h = try #require(NetlinkParse.messages(in: m).first)
        #expect(NftDecoder.elements(m, h) == nil)
        #expect(NftDecoder.generation(m, h) == nil)
    }

    // MARK: what libnftnl must never see

    static func be32(_ v: UInt32) -> [UInt8] { (0..<4).reversed().map { UInt8(v >> (8 * $0) & 0xff) } }
    static func string(_ s: String) -> [UInt8] { Array(s.utf8) + [0] }

    /// An nf_tables message (family inet) with `attributes` after its nfgenmsg.
    static func nft(_ type: UInt16, _ attributes: [UInt8]) -> [UInt8] {
        message(type: NftMessageType.subsystemShift | type, payload: [NftFamily.inet.rawValue, 0, 0, 0] + attributes)
    }

    static func decode<T>(_ m: [UInt8], _ decoder: ([UInt8], NetlinkHeader) -> T?) -> T? {
        NetlinkParse.messages(in: m).first.flatMap { decoder(m, $0) }
    }

    /// A rule of table t, chain c with these expressions (each a name and its data attributes).
    static func rule(_ expressions: [(String?, [UInt8])]) -> [UInt8] {
        let list = expressions.map { name, data in
            attribute(1, (name.map { attribute(1, string($0)) } ?? []) + attribute(2, data))  // NFTA_LIST_ELEM: NFTA_EXPR_NAME, _DATA
        }.flatMap { $0 }
        return nft(NftMessageType.newRule, attribute(1, string("t")) + attribute(2, string("c")) + attribute(4, list))
    }

    /// A NEWSETELEM of set s with one element: key 4 bytes, then `more` element attributes.
    static func element(_ more: [UInt8]) -> [UInt8] {
        let element = attribute(1, attribute(1, [192, 0, 2, 1])) + more  // NFTA_SET_ELEM_KEY: NFTA_DATA_VALUE
        return nft(NftMessageType.newSetElem, attribute(1, string("t")) + attribute(2, string("s")) + attribute(3, attribute(1, element)))
    }

    @Test("attributes libnftnl exits the process over (\"nf_tables kernel ABI is broken\") never reach it")
    func abiBreakage() {
        // The fuzzer's first find: a GETGEN answer whose NFTA_GEN_ID has 2 bytes. With 4 it decodes.
        #expect(Self.decode(Self.nft(NftMessageType.newGen, Self.attribute(1, [0, 7])), NftDecoder.generation) == nil)
        #expect(Self.decode(Self.nft(NftMessageType.newGen, Self.attribute(1, Self.be32(7))), NftDecoder.generation) == 7)
        // A table message read as the GETGEN answer: its name is NFTA_GEN_ID's number, 13 bytes for a u32.
        #expect(Self.decode(Self.nft(NftMessageType.newTable, Self.attribute(1, Self.string("hostnet-dnat"))), NftDecoder.generation) == nil)
        // A table whose flags (u32) have one byte; one with an empty name.
        #expect(Self.decode(Self.nft(NftMessageType.newTable, Self.attribute(1, Self.string("t")) + Self.attribute(2, [1])), NftDecoder.table) == nil)
        #expect(Self.decode(Self.nft(NftMessageType.newTable, Self.attribute(1, [])), NftDecoder.table) == nil)
        #expect(Self.decode(Self.nft(NftMessageType.newTable, Self.attribute(1, Self.string("t"))), NftDecoder.table)?.name == "t")
        // A base chain whose hook priority has 2 bytes (inside NFTA_CHAIN_HOOK).
        let hook = Self.attribute(1, Self.be32(3)) + Self.attribute(2, [0, 0])
        #expect(Self.decode(Self.nft(NftMessageType.newChain, Self.attribute(1, Self.string("t")) + Self.attribute(3, Self.string("c"))
                                     + Self.attribute(4, hook)), NftDecoder.chain) == nil)
        // A meta expression whose key has 3 bytes; a cmp whose data nest holds a verdict with a 1-byte code.
        #expect(Self.decode(Self.rule([("meta", Self.attribute(2, [0, 0, 1]))]), NftDecoder.rule) == nil)
        #expect(Self.decode(Self.rule([("cmp", Self.attribute(3, Self.attribute(2, Self.attribute(1, [1]))))]), NftDecoder.rule) == nil)
        let meta = Self.attribute(1, Self.be32(1)) + Self.attribute(2, Self.be32(16))
        #expect(Self.decode(Self.rule([("meta", meta)]), NftDecoder.rule)?.expressions == [.meta(key: 16, dreg: 1)])
    }

    @Test("inputs that make libnftnl read or write out of bounds never reach it")
    func libnftnlOutOfBounds() {
        // An expression without a name: libnftnl looks up a NULL string.
        #expect(Self.decode(Self.rule([(nil, [])]), NftDecoder.rule) == nil)
        // An unterminated name: libnftnl would read on into the next attribute.
        #expect(Self.decode(Self.nft(NftMessageType.newRule, Self.attribute(1, Self.string("t")) + Self.attribute(2, Self.string("c"))
                                     + Self.attribute(4, Self.attribute(1, Self.attribute(1, Array("meta".utf8))))), NftDecoder.rule) == nil)
        // A goto without its chain, a verdict without its code: libnftnl reads them from an uninitialized table.
        let goto = Self.attribute(2, Self.attribute(2, Self.attribute(1, Self.be32(UInt32(bitPattern: Nft.verdictGoto)))))
        #expect(Self.decode(Self.element(goto), NftDecoder.elements) == nil)
        #expect(Self.decode(Self.element(Self.attribute(2, Self.attribute(2, Self.attribute(2, Self.string("pick"))))), NftDecoder.elements) == nil)
        let gotoPick = Self.attribute(2, Self.attribute(2, Self.attribute(1, Self.be32(UInt32(bitPattern: Nft.verdictGoto))) + Self.attribute(2, Self.string("pick"))))
        #expect(Self.decode(Self.element(gotoPick), NftDecoder.elements)?.1.first?.verdict == NftVerdict(code: Nft.verdictGoto, chain: "pick"))
        // A goto in the key and an empty data nest (the fuzzer's second find): libnftnl marks the element as
        // having a verdict chain, which is NULL, and nftnl_set_elem_get_str runs strlen on it.
        let gotoKey = Self.attribute(1, Self.attribute(2, Self.attribute(1, Self.be32(UInt32(bitPattern: Nft.verdictGoto))) + Self.attribute(2, Self.string("pick"))))
        let keyless = { (more: [UInt8]) in
            Self.nft(NftMessageType.newSetElem, Self.attribute(1, Self.string("t")) + Self.attribute(2, Self.string("s")) + Self.attribute(3, Self.attribute(1, more)))
        }
        #expect(Self.decode(keyless(gotoKey + Self.attribute(2, [])), NftDecoder.elements) == nil)
        // An element attribute numbered past NFTA_SET_ELEM_MAX: libnftnl stores it past the end of its table.
        #expect(Self.decode(Self.element(Self.attribute(12, Self.be32(1))), NftDecoder.elements) == nil)
        // 17 concatenation fields: libnftnl keeps 16.
        let fields = (0..<17).flatMap { _ in Self.attribute(1, Self.attribute(1, Self.be32(4))) }
        let set = { (fields: [UInt8]) in
            Self.nft(NftMessageType.newSet, Self.attribute(1, Self.string("t")) + Self.attribute(2, Self.string("s")) + Self.attribute(9, Self.attribute(2, fields)))
        }
        #expect(Self.decode(set(fields), NftDecoder.set) == nil)
        // A field length of 5 bytes (the fuzzer's third find: libnftnl exits).
        #expect(Self.decode(set(Self.attribute(1, Self.attribute(1, Self.be32(4) + [0]))), NftDecoder.set) == nil)
        #expect(Self.decode(set(Array(fields.prefix(16 * 12))), NftDecoder.set)?.name == "s")
        // Nests deeper than any reply the kernel sends.
        func dynsets(_ n: Int) -> [UInt8] {  // NFTA_EXPR_NAME "dynset", NFTA_EXPR_DATA { NFTA_DYNSET_EXPR { … } }
            n == 0 ? Self.attribute(1, Self.string("meta"))
                : Self.attribute(1, Self.string("dynset")) + Self.attribute(2, Self.attribute(7, dynsets(n - 1)))
        }
        let nested = { (n: Int) in Self.nft(NftMessageType.newRule, Self.attribute(4, Self.attribute(1, dynsets(n)))) }
        #expect(Self.decode(nested(20), NftDecoder.rule) == nil)
        #expect(Self.decode(nested(2), NftDecoder.rule)?.expressions.count == 1)
    }

    @Test("every table of libnftnl's checks builds (a duplicate key would trap)")
    func checkTables() {
        typealias C = NftAttributeCheck
        let tables = [C.table, C.chain, C.hook, C.counters, C.set, C.setDescription, C.element, C.elementList, C.data, C.verdict,
                      C.rule, C.ruleCompat, C.generation, C.expression]
        #expect(tables.allSatisfy { !$0.attributes.isEmpty })
        #expect(NftAttributeCheck.expressions.count == 38)
    }

    // MARK: the seed corpus

    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz/corpus")

    static func seeds(_ target: String) throws -> [(String, [[UInt8]])] {
        let dir = corpus.appendingPathComponent(target)
        return try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted().map {
            ($0, NetlinkReplay.datagrams(Array(try Data(contentsOf: dir.appendingPathComponent($0)))))
        }
    }

    @Test("the recorded table dumps decode to the plans they were applied from")
    func recordedDumps() throws {
        let seeds = Dictionary(uniqueKeysWithValues: try Self.seeds("netlink"))
        let t = KernelReplyRecordingTests.table
        for (name, plan) in try KernelReplyRecordingTests.plans() {
            let datagrams = try #require(seeds[name], "missing seed \(name)")
            let dumped = try #require(try NetlinkReplay.readTable(datagrams, family: .inet, name: t))
            #expect(RulesetDecoder.decode(dumped) == NftablesNetlink.expected(plan), "\(name)")
        }
        #expect(try NetlinkReplay.readTable(try #require(seeds["dump-missing-table"]), family: .inet, name: t) == nil)
        let refused = try #require(seeds["acks-refused-eexist"])
        #expect(refused.flatMap { d in NetlinkParse.messages(in: d).compactMap { NetlinkParse.ack($0, in: d) } }.contains {
            $0.errno == 17 && $0.extOffset != nil })
    }

    @Test("the recorded conntrack dumps decode to their entries, the DNATed one included")
    func recordedConntrack() throws {
        let seeds = try Self.seeds("conntrack")
        #expect(seeds.count >= 2)
        for (name, datagrams) in seeds where name.hasPrefix("dump-") {
            var entries: [ConntrackEntry] = []
            let (end, scanned) = NetlinkReplay.conntrackDump(datagrams) { entries.append($0) }
            #expect(end == .finished && scanned == 3 && entries.count == 3, "\(name)")
            #expect(entries.contains { $0.original.protocolNumber == 17 && $0.reply.source != $0.original.destination }, "\(name)")
        }
    }
}
