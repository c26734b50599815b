// Reading netlink framing from plain bytes: message headers, NLMSG_ERROR payloads with extended acks,
// and attribute walks (to map an error offset back to the element or expression that failed). Pure.
// Netlink header fields are in host byte order.

enum NetlinkWire {
    static let headerLength = 16
    static let nlmsgNoop: UInt16 = 1
    static let nlmsgError: UInt16 = 2
    static let nlmsgDone: UInt16 = 3
    static let flagMulti: UInt16 = 0x2
    static let flagDumpInterrupted: UInt16 = 0x10
    static let flagCapped: UInt16 = 0x100
    static let flagAckTLVs: UInt16 = 0x200
    static let nlaTypeMask: UInt16 = 0x3fff
    /// EIO: what an NLMSG_ERROR that cannot be read (or names no errno) is reported as.
    static let malformedErrno: Int32 = 5

    static func align4(_ n: Int) -> Int { (n + 3) & ~3 }

    static func u16(_ b: [UInt8], _ at: Int) -> UInt16 {
        let lo = UInt16(b[at]), hi = UInt16(b[at + 1])
        return UInt32(1).littleEndian == 1 ? lo | hi << 8 : hi | lo << 8
    }

    static func u32(_ b: [UInt8], _ at: Int) -> UInt32 {
        let v = UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
        return UInt32(1).littleEndian == 1 ? v : v.byteSwapped
    }

    static func putU32(_ v: UInt32, into b: inout [UInt8], at: Int) {
        let h = Nft.hostOrder(v)
        for i in 0..<4 { b[at + i] = h[i] }
    }
}

struct NetlinkHeader: Sendable {
    var length: Int
    var type: UInt16
    var flags: UInt16
    var sequence: UInt32
    var portID: UInt32
    /// Offset of the header in the buffer it was read from.
    var offset: Int
    var payload: Range<Int> { (offset + NetlinkWire.headerLength)..<(offset + length) }
}

/// One NLMSG_ERROR: an error code (0 is an ACK) for the message with `sequence`.
struct NetlinkAck: Sendable {
    var sequence: UInt32
    /// Positive errno, 0 for an ACK.
    var errno: Int32
    /// NLMSGERR_ATTR_MSG.
    var extMessage: String?
    /// NLMSGERR_ATTR_OFFS: offset of the offending attribute from the start of the request message.
    var extOffset: Int?
}

enum NetlinkParse {
    /// Splits one datagram into messages; stops at a malformed one.
    static func messages(in b: [UInt8]) -> [NetlinkHeader] {
        var out: [NetlinkHeader] = []
        var i = 0
        while i + NetlinkWire.headerLength <= b.count {
            let len = Int(NetlinkWire.u32(b, i))
            guard len >= NetlinkWire.headerLength, i + len <= b.count else { break }
            out.append(NetlinkHeader(length: len, type: NetlinkWire.u16(b, i + 4), flags: NetlinkWire.u16(b, i + 6),
                                     sequence: NetlinkWire.u32(b, i + 8), portID: NetlinkWire.u32(b, i + 12), offset: i))
            i += NetlinkWire.align4(len)
        }
        return out
    }

    /// Decodes an NLMSG_ERROR message (struct nlmsgerr, then optional extended-ack TLVs).
    static func ack(_ h: NetlinkHeader, in b: [UInt8]) -> NetlinkAck? {
        let p = h.payload
        guard h.type == NetlinkWire.nlmsgError, p.count >= 4 + NetlinkWire.headerLength else { return nil }
        let error = Int32(bitPattern: NetlinkWire.u32(b, p.lowerBound))
        let inner = p.lowerBound + 4
        let origSeq = NetlinkWire.u32(b, inner + 8)
        let origLen = Int(NetlinkWire.u32(b, inner))
        // The kernel sends a negative errno (0 for an ACK); anything else is not an answer we can name (and
        // -Int32.min would trap): EIO.
        var ack = NetlinkAck(sequence: origSeq, errno: (-4095...0).contains(error) ? -error : NetlinkWire.malformedErrno,
                             extMessage: nil, extOffset: nil)
        guard h.flags & NetlinkWire.flagAckTLVs != 0 else { return ack }
        // The TLVs follow the echoed request: only its header when capped (or for an ACK), else all of it.
        let echoed = (h.flags & NetlinkWire.flagCapped != 0 || error == 0) ? NetlinkWire.headerLength : NetlinkWire.align4(origLen)
        var i = inner + echoed
        while i + 4 <= p.upperBound {
            let len = Int(NetlinkWire.u16(b, i)), type = NetlinkWire.u16(b, i + 2) & NetlinkWire.nlaTypeMask
            guard len >= 4, i + len <= p.upperBound else { break }
            let value = (i + 4)..<(i + len)
            switch type {
            case 1: // NLMSGERR_ATTR_MSG
                var bytes = Array(b[value])
                while bytes.last == 0 { bytes.removeLast() }
                ack.extMessage = String(decoding: bytes, as: UTF8.self)
            case 2: // NLMSGERR_ATTR_OFFS
                if value.count >= 4 { ack.extOffset = Int(NetlinkWire.u32(b, value.lowerBound)) }
            default: break
            }
            i += NetlinkWire.align4(len)
        }
        return ack
    }

    /// Attributes in `range` as (type, whole attribute range, value range).
    static func attributes(in b: [UInt8], _ range: Range<Int>) -> [(type: UInt16, whole: Range<Int>, value: Range<Int>)] {
        var out: [(UInt16, Range<Int>, Range<Int>)] = []
        var i = range.lowerBound
        while i + 4 <= range.upperBound {
            let len = Int(NetlinkWire.u16(b, i)), type = NetlinkWire.u16(b, i + 2) & NetlinkWire.nlaTypeMask
            guard len >= 4, i + len <= range.upperBound else { break }
            out.append((type, i..<(i + len), (i + 4)..<(i + len)))
            i += NetlinkWire.align4(len)
        }
        return out
    }

    /// For an nf_tables request message starting at `start` in `b`: the ranges (relative to the message
    /// start) of the children of the top-level attribute `listType` — the elements of NFTA_SET_ELEM_LIST_ELEMENTS
    /// (3) or the expressions of NFTA_RULE_EXPRESSIONS (4). An extended-ack offset inside one of them names it.
    static func childRanges(ofMessageAt start: Int, length: Int, in b: [UInt8], listType: UInt16) -> [Range<Int>] {
        let attrsStart = start + NetlinkWire.headerLength + 4  // nlmsghdr + nfgenmsg
        let end = start + length
        guard attrsStart <= end else { return [] }
        for a in attributes(in: b, attrsStart..<end) where a.type == listType {
            return attributes(in: b, a.value).map { ($0.whole.lowerBound - start)..<($0.whole.upperBound - start) }
        }
        return []
    }
}

/// The answer to one request (a GET, or a dump when `dump`), assembled from the datagrams that carry it:
/// the messages with the request's sequence number, up to the NLMSG_ERROR or NLMSG_DONE that ends it.
/// `NetlinkSession.request` feeds it what the socket receives; the fuzz target feeds it arbitrary bytes. Pure.
struct NetlinkReplyCollector {
    let sequence: UInt32
    let dump: Bool
    private var messages: [([UInt8], NetlinkHeader)] = []
    private var interrupted = false

    init(sequence: UInt32, dump: Bool) { self.sequence = sequence; self.dump = dump }

    /// Takes one datagram: the reply once it is complete, nil while more datagrams are needed.
    /// `DumpInterrupted` when the kernel flagged the dump as inconsistent (the ruleset changed meanwhile).
    mutating func consume(_ d: [UInt8]) throws(NetlinkSession.DumpInterrupted) -> NetlinkSession.Reply? {
        for h in NetlinkParse.messages(in: d) {
            guard h.sequence == sequence else { continue }  // stale answers to an earlier request
            if h.flags & NetlinkWire.flagDumpInterrupted != 0 { interrupted = true }
            switch h.type {
            case NetlinkWire.nlmsgError:
                let e = NetlinkParse.ack(h, in: d)?.errno ?? NetlinkWire.malformedErrno
                if e == 0 && dump { continue }
                if e == 0 { return .messages(messages) }
                return .error(e)
            case NetlinkWire.nlmsgDone:
                if interrupted { throw NetlinkSession.DumpInterrupted() }
                return .messages(messages)
            case NetlinkWire.nlmsgNoop:
                continue
            default:
                messages.append((d, h))
                if !dump { return .messages(messages) }
            }
        }
        return nil
    }
}

/// One nf_tables notification (a message of the NFNLGRP_NFTABLES multicast group), as much as a change
/// monitor needs: which table it names, or, for the NEWGEN that closes a transaction, the generation and
/// who committed it.
struct NftNotification: Sendable, Equatable {
    /// NFT_MSG_* (the low byte of the netlink message type).
    var message: UInt16
    var family: UInt8
    /// The table an object notification names (attribute 1 of tables, chains, rules, sets, elements, objects
    /// and flowtables alike); nil for NEWGEN.
    var table: String?
    /// The committing socket's port id (nlmsg_pid).
    var portID: UInt32
    /// NEWGEN: NFTA_GEN_ID, NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME.
    var generation: UInt32?
    var processID: UInt32?
    var processName: String?

    static let subsystemNftables: UInt16 = 10  // NFNL_SUBSYS_NFTABLES
    static let messageNewGen: UInt16 = 15      // NFT_MSG_NEWGEN

    var isNewGeneration: Bool { message == NftNotification.messageNewGen }

    /// Decodes one message of a notification datagram; nil for anything that is not an nf_tables message.
    static func parse(_ h: NetlinkHeader, in b: [UInt8]) -> NftNotification? {
        guard h.type >> 8 == subsystemNftables, h.payload.count >= 4 else { return nil }
        let p = h.payload
        var n = NftNotification(message: h.type & 0xff, family: b[p.lowerBound], table: nil, portID: h.portID)
        func string(_ r: Range<Int>) -> String {
            var v = b[r]
            while v.last == 0 { v = v.dropLast() }
            return String(decoding: v, as: UTF8.self)
        }
        func bigEndian32(_ r: Range<Int>) -> UInt32? {
            guard r.count == 4 else { return nil }
            return b[r].reduce(0) { $0 << 8 | UInt32($1) }
        }
        for a in NetlinkParse.attributes(in: b, (p.lowerBound + 4)..<p.upperBound) {
            if n.isNewGeneration {
                switch a.type {
                case 1: n.generation = bigEndian32(a.value)
                case 2: n.processID = bigEndian32(a.value)
                case 3: n.processName = string(a.value)
                default: break
                }
            } else if a.type == 1 {
                n.table = string(a.value)
            }
        }
        return n
    }
}

/// Folds notifications into transactions: a transaction touched the table when one of its messages named
/// `table inet <table>`; it was ours when its NEWGEN came from one of this process's sockets. Pure.
struct NftChangeFilter {
    let table: String
    let isOwnPort: (UInt32) -> Bool
    private var touched = false

    init(table: String, isOwnPort: @escaping (UInt32) -> Bool) { self.table = table; self.isOwnPort = isOwnPort }

    /// The change to report when `n` closes a transaction that touched the table and was not ours.
    mutating func consume(_ n: NftNotification) -> NftablesChange? {
        guard n.isNewGeneration else {
            if n.family == NftFamily.inet.rawValue && n.table == table { touched = true }
            return nil
        }
        defer { touched = false }
        guard touched, !isOwnPort(n.portID) else { return nil }
        return NftablesChange(generation: n.generation ?? 0, processID: n.processID, processName: n.processName, lostNotifications: false)
    }

    /// The changes that one datagram of notifications completes (`NftablesChangeMonitor` feeds it what its
    /// socket receives; the fuzz target feeds it arbitrary bytes).
    mutating func consume(datagram: [UInt8]) -> [NftablesChange] {
        NetlinkParse.messages(in: datagram).compactMap { h in NftNotification.parse(h, in: datagram).flatMap { consume($0) } }
    }

    /// Notifications were lost: whatever was half-seen is forgotten.
    mutating func reset() { touched = false }
}
