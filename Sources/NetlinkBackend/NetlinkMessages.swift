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
        var ack = NetlinkAck(sequence: origSeq, errno: -error, extMessage: nil, extOffset: nil)
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
