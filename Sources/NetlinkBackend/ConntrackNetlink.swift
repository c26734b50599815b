// The C side of conntrack over netlink (ctnetlink, NFNL_SUBSYS_CTNETLINK): libmnl builds the dump and
// delete requests. The socket and the namespace handling are NftNetlink.swift's; decoding the kernel's
// answers is pure Swift (ConntrackWire in Conntrack.swift). Every unsafe pointer of the conntrack code is here.
import CNetfilter
import NetAddress
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// ctnetlink message types and attribute numbers, from linux/netfilter/nfnetlink_conntrack.h.
enum Ctnl {
    static let subsystemShift = UInt16(NFNL_SUBSYS_CTNETLINK) << 8
    /// Dump answers are NEW messages.
    static let msgNew = subsystemShift | UInt16(IPCTNL_MSG_CT_NEW.rawValue)
    static let msgGet = subsystemShift | UInt16(IPCTNL_MSG_CT_GET.rawValue)
    static let msgDelete = subsystemShift | UInt16(IPCTNL_MSG_CT_DELETE.rawValue)

    static let tupleOrig = UInt16(CTA_TUPLE_ORIG.rawValue)
    static let tupleReply = UInt16(CTA_TUPLE_REPLY.rawValue)
    static let id = UInt16(CTA_ID.rawValue)
    static let zone = UInt16(CTA_ZONE.rawValue)
    static let filter = UInt16(CTA_FILTER.rawValue)
    static let filterOrigFlags = UInt16(CTA_FILTER_ORIG_FLAGS.rawValue)
    static let filterProtoNum = UInt32(HND_CTA_FILTER_F_CTA_PROTO_NUM)

    static let tupleIP = UInt16(CTA_TUPLE_IP.rawValue)
    static let tupleProto = UInt16(CTA_TUPLE_PROTO.rawValue)
    static let ipV4Src = UInt16(CTA_IP_V4_SRC.rawValue)
    static let ipV4Dst = UInt16(CTA_IP_V4_DST.rawValue)
    static let ipV6Src = UInt16(CTA_IP_V6_SRC.rawValue)
    static let ipV6Dst = UInt16(CTA_IP_V6_DST.rawValue)
    static let protoNum = UInt16(CTA_PROTO_NUM.rawValue)
    static let protoSrcPort = UInt16(CTA_PROTO_SRC_PORT.rawValue)
    static let protoDstPort = UInt16(CTA_PROTO_DST_PORT.rawValue)

    static func addressFamily(_ f: IPFamily) -> UInt8 { UInt8(f == .ipv4 ? AF_INET : AF_INET6) }
    static func family(addressFamily af: UInt8) -> IPFamily? {
        switch Int32(af) {
        case AF_INET: return .ipv4
        case AF_INET6: return .ipv6
        default: return nil
        }
    }
}

/// Builds ctnetlink requests with libmnl and appends them to a byte array (several may share one datagram:
/// the kernel processes the messages of a non-batch nfnetlink datagram one after the other).
struct ConntrackEncoder {
    /// A request is at most a few hundred bytes (two tuples of IPv6 addresses).
    private var scratch = [UInt8](repeating: 0, count: 4096)

    private mutating func build(into out: inout [UInt8], type: UInt16, flags: Int32, family: IPFamily, seq: UInt32,
                                _ body: (UnsafeMutablePointer<nlmsghdr>) -> Void) {
        let bytes: [UInt8] = scratch.withUnsafeMutableBytes { raw in
            memset(raw.baseAddress!, 0, raw.count)
            let nlh = mnl_nlmsg_put_header(raw.baseAddress!)!
            nlh.pointee.nlmsg_type = type
            nlh.pointee.nlmsg_flags = UInt16(NLM_F_REQUEST | flags)
            nlh.pointee.nlmsg_seq = seq
            let nfg = mnl_nlmsg_put_extra_header(nlh, MemoryLayout<nfgenmsg>.size)!.assumingMemoryBound(to: nfgenmsg.self)
            nfg.pointee.nfgen_family = Ctnl.addressFamily(family)
            nfg.pointee.version = UInt8(NFNETLINK_V0)
            nfg.pointee.res_id = 0
            body(nlh)
            precondition(Int(nlh.pointee.nlmsg_len) <= raw.count, "ctnetlink request larger than the encoder's scratch buffer")
            return Array(UnsafeRawBufferPointer(start: raw.baseAddress, count: Int(nlh.pointee.nlmsg_len)))
        }
        out.append(contentsOf: bytes)
        let pad = NetlinkWire.align4(out.count) - out.count
        if pad > 0 { out.append(contentsOf: [UInt8](repeating: 0, count: pad)) }
    }

    /// `IPCTNL_MSG_CT_GET` with `NLM_F_DUMP` for one address family. With `protocolNumber`, the kernel is
    /// asked to send only entries of that protocol (CTA_FILTER, kernel 5.8+; older kernels ignore the filter
    /// and the caller filters again anyway).
    mutating func dumpRequest(family: IPFamily, protocolNumber: UInt8?, seq: UInt32, into out: inout [UInt8]) {
        build(into: &out, type: Ctnl.msgGet, flags: NLM_F_DUMP, family: family, seq: seq) { nlh in
            guard let p = protocolNumber else { return }
            let orig = mnl_attr_nest_start(nlh, Ctnl.tupleOrig)
            let proto = mnl_attr_nest_start(nlh, Ctnl.tupleProto)
            mnl_attr_put_u8(nlh, Ctnl.protoNum, p)
            mnl_attr_nest_end(nlh, proto)
            mnl_attr_nest_end(nlh, orig)
            let filter = mnl_attr_nest_start(nlh, Ctnl.filter)
            mnl_attr_put_u32(nlh, Ctnl.filterOrigFlags, Ctnl.filterProtoNum)  // NLA_U32: host byte order
            mnl_attr_nest_end(nlh, filter)
        }
    }

    /// `IPCTNL_MSG_CT_DELETE` (with NLM_F_ACK) for exactly `entry`: its original tuple, its id (so that a
    /// newer entry reusing the tuple is not deleted: the kernel answers ENOENT instead) and its zone.
    /// The original tuple is always present: a delete without a tuple would flush the whole table.
    /// With `includeReply`, the reply tuple is written too (the kernel ignores it on delete; tests use it to
    /// build dump-like messages).
    mutating func entryMessage(_ entry: ConntrackEntry, type: UInt16 = Ctnl.msgDelete, seq: UInt32, includeReply: Bool = false,
                               into out: inout [UInt8]) {
        build(into: &out, type: type, flags: NLM_F_ACK, family: entry.family, seq: seq) { nlh in
            ConntrackEncoder.putTuple(nlh, Ctnl.tupleOrig, entry.original)
            if includeReply { ConntrackEncoder.putTuple(nlh, Ctnl.tupleReply, entry.reply) }
            if let id = entry.id { mnl_attr_put_u32(nlh, Ctnl.id, id.bigEndian) }
            if entry.zone != 0 { mnl_attr_put_u16(nlh, Ctnl.zone, entry.zone.bigEndian) }
        }
    }

    private static func putTuple(_ nlh: UnsafeMutablePointer<nlmsghdr>, _ type: UInt16, _ t: ConntrackTuple) {
        let tuple = mnl_attr_nest_start(nlh, type)
        let ip = mnl_attr_nest_start(nlh, Ctnl.tupleIP)
        let v4 = t.source.family == .ipv4
        t.source.bytes.withUnsafeBytes { mnl_attr_put(nlh, v4 ? Ctnl.ipV4Src : Ctnl.ipV6Src, $0.count, $0.baseAddress) }
        t.destination.bytes.withUnsafeBytes { mnl_attr_put(nlh, v4 ? Ctnl.ipV4Dst : Ctnl.ipV6Dst, $0.count, $0.baseAddress) }
        mnl_attr_nest_end(nlh, ip)
        let proto = mnl_attr_nest_start(nlh, Ctnl.tupleProto)
        mnl_attr_put_u8(nlh, Ctnl.protoNum, t.protocolNumber)
        if let p = t.sourcePort { mnl_attr_put_u16(nlh, Ctnl.protoSrcPort, UInt16(truncatingIfNeeded: p).bigEndian) }
        if let p = t.destinationPort { mnl_attr_put_u16(nlh, Ctnl.protoDstPort, UInt16(truncatingIfNeeded: p).bigEndian) }
        mnl_attr_nest_end(nlh, proto)
        mnl_attr_nest_end(nlh, tuple)
    }
}
