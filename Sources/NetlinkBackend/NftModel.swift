import NetAddress

// Pure Swift description of the nf_tables objects this backend writes and reads. Only
// `NftNetlink.swift` turns these into netlink messages (through libnftnl) and back.
// Numbers are the kernel's (`linux/netfilter/nf_tables.h`), spelled out so that this file needs no C.

/// An nf_tables address family (`NFPROTO_*`).
public enum NftFamily: UInt8, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case inet = 1
    case ip = 2
    case arp = 3
    case netdev = 5
    case bridge = 7
    case ip6 = 10

    public var description: String {
        switch self {
        case .inet: return "inet"
        case .ip: return "ip"
        case .arp: return "arp"
        case .netdev: return "netdev"
        case .bridge: return "bridge"
        case .ip6: return "ip6"
        }
    }

    /// `ip`, `ip6`, `inet`, … as nft spells them.
    public init?(name: String) {
        guard let f = NftFamily.allCases.first(where: { $0.description == name }) else { return nil }
        self = f
    }
}

/// Kernel constants used by the ruleset (values from `nf_tables.h`, `netfilter.h`, nft's datatypes).
enum Nft {
    // Registers.
    static let regVerdict: UInt32 = 0
    static let reg1: UInt32 = 1
    static let reg2: UInt32 = 2
    static let reg32_01: UInt32 = 9
    static let reg32_02: UInt32 = 10
    static let reg32_03: UInt32 = 11
    static let reg32_05: UInt32 = 13
    static let reg32_06: UInt32 = 14

    // enum nft_meta_keys
    static let metaNFProto: UInt32 = 15
    static let metaL4Proto: UInt32 = 16

    // enum nft_ct_keys / nft_ct direction
    static let ctStatus: UInt32 = 2
    static let ctDstIP: UInt32 = 20
    static let ctDstIP6: UInt32 = 22
    static let ctDirOriginal: UInt8 = 0
    /// IPS_DST_NAT
    static let ctStatusDNAT: UInt32 = 0x20

    // enum nft_payload_bases
    static let payloadNetworkHeader: UInt32 = 1
    static let payloadTransportHeader: UInt32 = 2

    // enum nft_cmp_ops
    static let cmpEq: UInt32 = 0
    static let cmpNeq: UInt32 = 1

    // enum nft_ng_types
    static let numgenRandom: UInt32 = 1

    // enum nft_nat_types
    static let natDNAT: UInt32 = 1
    /// NF_NAT_RANGE_MAP_IPS, NF_NAT_RANGE_PROTO_SPECIFIED
    static let natRangeMapIPs: UInt32 = 1
    static let natRangeProtoSpecified: UInt32 = 2

    // enum nft_set_flags
    static let setAnonymous: UInt32 = 0x1
    static let setConstant: UInt32 = 0x2
    static let setMap: UInt32 = 0x8
    static let setInterval: UInt32 = 0x4
    static let setTimeout: UInt32 = 0x10
    /// NFT_SET_EVAL: `flags dynamic` (updated from the packet path).
    static let setEval: UInt32 = 0x20
    /// NFT_SET_CONCAT: a concatenation with intervals (nft's pipapo set).
    static let setConcat: UInt32 = 0x80

    // enum nft_dynset_ops / nft_byteorder_ops
    static let dynsetUpdate: UInt32 = 1
    static let byteorderHton: UInt32 = 1

    // nft datatypes (nftables src/datatype.h); concatenations shift earlier types left by 6 bits each.
    static let typeInteger: UInt32 = 4
    static let typeIPv4Addr: UInt32 = 7
    static let typeIPv6Addr: UInt32 = 8
    static let typeInetProto: UInt32 = 12
    static let typeInetService: UInt32 = 13
    /// NFT_DATA_VERDICT
    static let dataVerdict: UInt32 = 0xffff_ff00

    // Verdict codes.
    static let verdictAccept: Int32 = 1   // NF_ACCEPT (chain policy)
    static let verdictGoto: Int32 = -4    // NFT_GOTO
    static let verdictJump: Int32 = -3    // NFT_JUMP

    // Hooks (enum nf_inet_hooks).
    static let hookOutput: UInt32 = 3
    static let hookPostrouting: UInt32 = 4

    // nfproto values compared against `meta nfproto` and used by `nat` expressions.
    static let nfprotoIPv4: UInt8 = 2
    static let nfprotoIPv6: UInt8 = 10

    static func concat(_ types: [UInt32]) -> UInt32 { types.reduce(0) { $0 << 6 | $1 } }

    /// A 32-bit value in host byte order (what the kernel keeps in registers for `ct status`, numgen, …).
    static func hostOrder(_ v: UInt32) -> [UInt8] {
        let le = [UInt8(v & 0xff), UInt8(v >> 8 & 0xff), UInt8(v >> 16 & 0xff), UInt8(v >> 24)]
        return UInt32(1).littleEndian == 1 ? le : le.reversed()
    }

    static func hostOrderValue(_ b: some Collection<UInt8>) -> UInt32? {
        guard b.count == 4 else { return nil }
        let bytes = UInt32(1).littleEndian == 1 ? Array(b) : Array(b.reversed())
        return UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24
    }

    static func bigEndian16(_ v: Int) -> [UInt8] { [UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }
}

/// One expression of a rule, in the kernel's terms (what `nft --debug=netlink` prints).
enum NftExpr: Hashable, Sendable, CustomStringConvertible {
    case meta(key: UInt32, dreg: UInt32)
    case cmp(op: UInt32, sreg: UInt32, data: [UInt8])
    case payload(base: UInt32, offset: UInt32, len: UInt32, dreg: UInt32)
    /// `dreg` nil: a plain set lookup; 0: verdict map; other: data map.
    case lookup(set: String, setID: UInt32?, sreg: UInt32, dreg: UInt32?, flags: UInt32?)
    case ct(key: UInt32, dreg: UInt32, direction: UInt8?)
    case bitwise(sreg: UInt32, dreg: UInt32, len: UInt32, mask: [UInt8], xor: [UInt8])
    case numgen(dreg: UInt32, modulus: UInt32, type: UInt32, offset: UInt32)
    case immediate(dreg: UInt32, data: [UInt8])
    case nat(type: UInt32, family: UInt32, addrMin: UInt32?, addrMax: UInt32?, protoMin: UInt32?, protoMax: UInt32?, flags: UInt32?)
    case masq
    /// `update @set { <sreg> }` (no per-rule timeout: the set's own applies).
    case dynset(op: UInt32, sreg: UInt32, set: String, setID: UInt32?)
    case byteorder(sreg: UInt32, dreg: UInt32, op: UInt32, len: UInt32, size: UInt32)
    /// Anything else read back from the kernel: its name only.
    case other(String)

    var name: String {
        switch self {
        case .meta: return "meta"
        case .cmp: return "cmp"
        case .payload: return "payload"
        case .lookup: return "lookup"
        case .ct: return "ct"
        case .bitwise: return "bitwise"
        case .numgen: return "numgen"
        case .immediate: return "immediate"
        case .nat: return "nat"
        case .masq: return "masq"
        case .dynset: return "dynset"
        case .byteorder: return "byteorder"
        case .other(let n): return n
        }
    }

    /// The same expression with the fields the kernel fills in or renames on its own cleared, so that a
    /// rule read back compares equal to the rule that was sent: set ids and lookup flags are not dumped the
    /// same way, anonymous set names are assigned by the kernel, and `nat` gains max registers and flags.
    var normalized: NftExpr {
        switch self {
        case let .lookup(set, _, sreg, dreg, _):
            return .lookup(set: set.hasPrefix("__") ? "__anonymous" : set, setID: nil, sreg: sreg, dreg: dreg, flags: nil)
        case let .nat(type, family, addrMin, _, protoMin, _, _):
            return .nat(type: type, family: family, addrMin: addrMin, addrMax: nil, protoMin: protoMin, protoMax: nil, flags: nil)
        case let .dynset(op, sreg, set, _):
            return .dynset(op: op, sreg: sreg, set: set, setID: nil)
        default:
            return self
        }
    }

    var description: String {
        func hex(_ b: [UInt8]) -> String { "0x" + b.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() }
        switch self {
        case let .meta(key, dreg): return "meta load \(key) => reg \(dreg)"
        case let .cmp(op, sreg, data): return "cmp \(op == Nft.cmpEq ? "eq" : op == Nft.cmpNeq ? "neq" : "op\(op)") reg \(sreg) \(hex(data))"
        case let .payload(base, offset, len, dreg): return "payload load \(len)b @ base \(base) + \(offset) => reg \(dreg)"
        case let .lookup(set, _, sreg, dreg, _): return "lookup reg \(sreg) set \(set)" + (dreg.map { " dreg \($0)" } ?? "")
        case let .ct(key, dreg, dir): return "ct load \(key) => reg \(dreg)" + (dir.map { " dir \($0)" } ?? "")
        case let .bitwise(sreg, dreg, _, mask, xor): return "bitwise reg \(dreg) = (reg \(sreg) & \(hex(mask))) ^ \(hex(xor))"
        case let .numgen(dreg, mod, type, offset): return "numgen reg \(dreg) = \(type == Nft.numgenRandom ? "random" : "type\(type)") mod \(mod) offset \(offset)"
        case let .immediate(dreg, data): return "immediate reg \(dreg) \(hex(data))"
        case let .nat(type, family, amin, _, pmin, _, _):
            return "nat \(type == Nft.natDNAT ? "dnat" : "type\(type)") family \(family)" + (amin.map { " addr_min reg \($0)" } ?? "") + (pmin.map { " proto_min reg \($0)" } ?? "")
        case .masq: return "masq"
        case let .dynset(op, sreg, set, _): return "dynset \(op == Nft.dynsetUpdate ? "update" : "op\(op)") reg_key \(sreg) set \(set)"
        case let .byteorder(sreg, dreg, op, len, size): return "byteorder reg \(dreg) = \(op == Nft.byteorderHton ? "hton" : "ntoh")(reg \(sreg), \(size), \(len))"
        case .other(let n): return n
        }
    }
}

struct NftTable: Hashable, Sendable {
    var family: NftFamily
    var name: String
    var flags: UInt32 = 0
    /// NFTA_TABLE_USERDATA (nft keeps a table's `comment` there); nil when the table has none.
    var userdata: [UInt8]? = nil

    /// The table's `comment` (TLV type NFTNL_UDATA_TABLE_COMMENT, NUL-terminated).
    var comment: String? {
        guard let u = userdata else { return nil }
        return Userdata.string(in: u, type: 0)
    }
}

struct NftBaseHook: Hashable, Sendable {
    var type: String
    var hook: UInt32
    var priority: Int32
    var policy: Int32 = Nft.verdictAccept
}

struct NftChain: Hashable, Sendable {
    var family: NftFamily
    var table: String
    var name: String
    var base: NftBaseHook?
}

struct NftSet: Hashable, Sendable {
    var family: NftFamily
    var table: String
    var name: String
    /// Batch-unique id so that rules and elements in the same batch can refer to the set before it has a
    /// kernel-assigned name (anonymous sets) or handle.
    var id: UInt32?
    var flags: UInt32
    var keyType: UInt32
    var keyLength: UInt32
    var dataType: UInt32?
    var dataLength: UInt32?
    /// NFTA_SET_DESC_SIZE (constant anonymous sets announce their size).
    var size: UInt32?
    var userdata: [UInt8]
    /// NFTA_SET_TIMEOUT in milliseconds (`timeout 600s`); nil: elements never expire.
    var timeout: UInt64? = nil
    /// NFTA_SET_DESC_CONCAT: the byte length of each field of a concatenation with intervals.
    var concatFields: [UInt8]? = nil

    var isAnonymous: Bool { flags & Nft.setAnonymous != 0 }
    var isMap: Bool { flags & Nft.setMap != 0 }
}

struct NftVerdict: Hashable, Sendable {
    var code: Int32
    var chain: String?
}

struct NftElement: Hashable, Sendable {
    var key: [UInt8]
    /// NFTA_SET_ELEM_KEY_END: the last key of an interval (sets with `flags interval` and concatenations).
    var keyEnd: [UInt8]? = nil
    var data: [UInt8]? = nil
    var verdict: NftVerdict? = nil
    /// NFTA_SET_ELEM_USERDATA (nft keeps an element's `comment` there).
    var userdata: [UInt8]? = nil

    /// The element's `comment` (TLV type NFTNL_UDATA_SET_ELEM_COMMENT, NUL-terminated).
    var comment: String? {
        guard let u = userdata else { return nil }
        return Userdata.string(in: u, type: 0)
    }
}

struct NftRule: Hashable, Sendable {
    var family: NftFamily
    var table: String
    var chain: String
    var expressions: [NftExpr]
    var userdata: [UInt8]?
    var handle: UInt64? = nil

    /// The `comment` nft stores in the rule's userdata (TLV type NFTNL_UDATA_RULE_COMMENT, NUL-terminated).
    var comment: String? {
        guard let u = userdata else { return nil }
        return Userdata.string(in: u, type: 0)
    }
}

/// nftnl_udata TLVs: a type byte, a length byte, then the value; u32 values in host byte order.
enum Userdata {
    static func u32(_ type: UInt8, _ value: UInt32) -> [UInt8] { [type, 4] + Nft.hostOrder(value) }

    static func string(_ type: UInt8, _ s: String) -> [UInt8] {
        let bytes = Array(s.utf8) + [0]
        precondition(bytes.count <= 255, "userdata string too long")
        return [type, UInt8(bytes.count)] + bytes
    }

    static func entries(_ u: [UInt8]) -> [(type: UInt8, value: ArraySlice<UInt8>)] {
        var out: [(UInt8, ArraySlice<UInt8>)] = []
        var i = 0
        while i + 2 <= u.count {
            let t = u[i], l = Int(u[i + 1])
            guard i + 2 + l <= u.count else { break }
            out.append((t, u[(i + 2)..<(i + 2 + l)]))
            i += 2 + l
        }
        return out
    }

    static func string(in u: [UInt8], type: UInt8) -> String? {
        guard let e = entries(u).first(where: { $0.type == type }) else { return nil }
        var v = Array(e.value)
        if v.last == 0 { v.removeLast() }
        return String(decoding: v, as: UTF8.self)
    }

    /// Comment userdata exactly as nft writes it (rules: NFTNL_UDATA_RULE_COMMENT, elements:
    /// NFTNL_UDATA_SET_ELEM_COMMENT; both are type 0).
    static func ruleComment(_ comment: String) -> [UInt8] { string(0, comment) }
    static func elementComment(_ comment: String) -> [UInt8] { string(0, comment) }
    /// A table's comment (NFTNL_UDATA_TABLE_COMMENT, type 0): nft 1.0.6 sends
    /// `table inet t { comment "managed by hostnet-dnat" }` as NFTA_TABLE_USERDATA `00 18 "managed by hostnet-dnat\0"`.
    static func tableComment(_ comment: String) -> [UInt8] { string(0, comment) }

    /// A nested TLV (nftnl_udata_nest_start/end): type, total length of the content, the content.
    static func nest(_ type: UInt8, _ content: [UInt8]) -> [UInt8] {
        precondition(content.count <= 255, "userdata nest too long")
        return [type, UInt8(content.count)] + content
    }

    // Set userdata exactly as nft 1.0.6 writes it for the declarations in docs/ruleset.md, so that
    // `nft list` prints our sets the same way it prints sets that nft created (src/mnl.c, set add):
    // KEYBYTEORDER = 0, DATABYTEORDER = 1, KEY_TYPEOF = 3, DATA_TYPEOF = 4, DATA_INTERVAL = 6; byte orders:
    // 0 invalid (concatenations), 1 host, 2 big endian. A typeof nest holds TYPEOF_EXPR = 0 (nft's
    // expression type) and TYPEOF_DATA = 1 (that expression's own udata). A concatenation's udata is one
    // nest per field (type = field index) holding SUB_TYPE = 0 (expression type) and SUB_DATA = 1.
    // Expression types (nft's enum expr_types): payload 7, meta 9, concat 13, numgen 23.
    enum ExprType {
        static let payload: UInt32 = 7
        static let meta: UInt32 = 9
        static let concat: UInt32 = 13
        static let numgen: UInt32 = 23
    }

    /// Payload udata: DESC = 0 (nft's enum proto_desc_id: th 11, ip 12, ip6 13) and TYPE = 1 (index of
    /// the header field in that protocol's template table: ip daddr 12, ip6 daddr 9, th dport 2).
    static func payloadExpr(desc: UInt32, field: UInt32) -> [UInt8] { u32(0, desc) + u32(1, field) }
    /// Meta udata: KEY = 0.
    static func metaExpr(key: UInt32) -> [UInt8] { u32(0, key) }
    /// Numgen udata: TYPE = 0, MOD = 1, OFFSET = 2.
    static func numgenExpr(type: UInt32, modulus: UInt32, offset: UInt32) -> [UInt8] {
        u32(0, type) + u32(1, modulus) + u32(2, offset)
    }

    static func concat(_ fields: [(type: UInt32, data: [UInt8])]) -> [UInt8] {
        fields.enumerated().flatMap { i, f in nest(UInt8(i), u32(0, f.type) + nest(1, f.data)) }
    }

    static func typeof(_ exprType: UInt32, _ data: [UInt8]) -> [UInt8] { u32(0, exprType) + nest(1, data) }

    /// `type ipv4_addr . inet_proto . inet_service : verdict`: a concatenation of plain types has no field
    /// udata (nft writes the empty TYPEOF_DATA nest), and a verdict has no data typeof.
    static var concatVerdictMap: [UInt8] {
        u32(0, 0) + u32(1, 0) + nest(3, typeof(ExprType.concat, [])) + u32(6, 0)
    }

    /// `type ipv4_addr` / `type ipv6_addr`
    static var addressSet: [UInt8] { u32(0, 2) }

    /// `typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport` (ip6 alike).
    static func endpointsMap(ipv6: Bool) -> [UInt8] {
        let daddr = (type: ExprType.payload, data: payloadExpr(desc: ipv6 ? 13 : 12, field: ipv6 ? 9 : 12))
        let dport = (type: ExprType.payload, data: payloadExpr(desc: 11, field: 2))
        let l4proto = (type: ExprType.meta, data: metaExpr(key: Nft.metaL4Proto))
        let slot = (type: ExprType.numgen, data: numgenExpr(type: Nft.numgenRandom, modulus: 1, offset: 0))
        return u32(0, 0) + u32(1, 0)
            + nest(3, typeof(ExprType.concat, concat([daddr, l4proto, dport, slot])))
            + nest(4, typeof(ExprType.concat, concat([daddr, dport])))
            + u32(6, 0)
    }
}

/// One message of a batch, with what it does in words, for error messages.
struct NftOperation: Sendable {
    enum Kind: Sendable {
        case newTable(NftTable)
        case deleteTable(NftTable)
        case newChain(NftChain)
        /// Deletes the chain and the rules in it (the kernel removes a chain's own rules with it, unless
        /// the message carries NLM_F_NONREC, which we never send); it fails with EBUSY while an element or a
        /// rule elsewhere still jumps to it, so it must come after their deletes in the batch.
        case deleteChain(NftChain)
        case newSet(NftSet)
        /// Deletes a set or map with its elements (no NLM_F_NONREC); it fails with EBUSY while a rule still
        /// looks it up, so it must come after the deletes (or the flush) of those rules in the batch.
        case deleteSet(NftSet)
        /// Deletes every rule of the chain (NFT_MSG_DELRULE without a handle, `nft flush chain`), keeping the
        /// chain and whatever jumps to it: an affinity chain whose rules are written anew.
        case flushChain(NftChain)
        /// `set` carries the target set's family, table, name and id; its other fields are ignored.
        case newElements(NftSet, [NftElement])
        /// Deletes elements by key (data, verdict and userdata of `elements` are not sent).
        case deleteElements(NftSet, [NftElement])
        case newRule(NftRule)
    }

    var kind: Kind
    var description: String
    /// For `newElements`: describes element `i` of this message. Computed only when needed (an element the
    /// kernel refused), since a large plan has a hundred thousand elements.
    var elementDescription: @Sendable (Int) -> String = { i in "element \(i + 1)" }
    /// For `newRule`: one description per expression (same order).
    var expressionDescriptions: [String] = []
    /// NLM_F_EXCL for `newChain` / `newSet` / `newElements`: fail with EEXIST when the object is already there instead of
    /// keeping it. Incremental updates use it, so that a kernel table that is not what the caller believes
    /// (edited by hand) makes the whole batch fail rather than silently diverge.
    var exclusive = false
}
