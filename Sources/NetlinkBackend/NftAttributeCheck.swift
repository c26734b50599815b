// The attribute checks libnftnl makes before it parses a message, restated in Swift so that a message that
// would fail them never reaches it. libnftnl (1.2.4) validates each attribute it knows with libmnl and, when
// one is malformed (a u32 of other than 4 bytes, an empty string, a 1-3 byte nest), calls abi_breakage(),
// which prints "nf_tables kernel ABI is broken" and exit()s the whole process: one bad reply would end the
// agent. A few more inputs make it read or write out of bounds: an expression without a name (NULL
// dereference), a verdict without its code or its chain (an uninitialized table), an element's data nest
// with neither value nor verdict (a NULL chain), a set element attribute
// numbered past NFTA_SET_ELEM_MAX (its parser checks against NFTA_SET_MAX and writes past its table), and
// more than 16 concatenation fields (a fixed array). Found by the netlink fuzz target (Tests/Fuzz).
//
// The tables list, for each kind of object, the attributes libnftnl validates and the libmnl type it
// checks them against (the nf_tables ABI), and which nested attributes it goes on to parse. Pure; no
// pointers: the constants only come from the C headers.
import CNetfilter

enum NftAttributeCheck {
    indirect enum Kind {
        case u8, u16, u32, u64, string, nulString, binary, nested
        /// A nest parsed with its own table.
        case object(Policy)
        /// NFTA_DATA_* (a value or a verdict), as nftnl_parse_data reads it.
        case data
        case verdict
        /// NFTA_EXPR_* (a name, and data checked by the expression's table).
        case expression
        /// NFTA_LIST_ELEM expressions.
        case expressions
        /// NFTA_LIST_ELEM set elements.
        case elements
        /// NFTA_SET_DESC_CONCAT: NFTA_LIST_ELEM nests of NFTA_SET_FIELD_LEN.
        case concat
    }

    struct Policy {
        var attributes: [UInt16: Kind]
        /// Attributes numbered above this make the whole message invalid (nil: libnftnl skips them).
        var rejectAbove: UInt16? = nil
    }

    private static func a<T: RawRepresentable>(_ v: T) -> UInt16 where T.RawValue: BinaryInteger { UInt16(truncatingIfNeeded: v.rawValue) }
    private static func a(_ v: Int32) -> UInt16 { UInt16(truncatingIfNeeded: v) }

    static let table = Policy(attributes: [
        1: .string,  // NFTA_TABLE_NAME
        4: .u64,  // NFTA_TABLE_HANDLE
        2: .u32,  // NFTA_TABLE_FLAGS
        3: .u32,  // NFTA_TABLE_USE
        7: .u32,  // NFTA_TABLE_OWNER
        6: .binary,  // NFTA_TABLE_USERDATA
    ])

    static let hook = Policy(attributes: [
        1: .u32,  // NFTA_HOOK_HOOKNUM
        2: .u32,  // NFTA_HOOK_PRIORITY
        3: .string,  // NFTA_HOOK_DEV
    ])

    static let counters = Policy(attributes: [
        1: .u64,  // NFTA_COUNTER_BYTES
        2: .u64,  // NFTA_COUNTER_PACKETS
    ])

    static let chain = Policy(attributes: [
        3: .string,  // NFTA_CHAIN_NAME
        1: .string,  // NFTA_CHAIN_TABLE
        7: .string,  // NFTA_CHAIN_TYPE
        4: .object(hook),  // NFTA_CHAIN_HOOK
        8: .object(counters),  // NFTA_CHAIN_COUNTERS
        5: .u32,  // NFTA_CHAIN_POLICY
        6: .u32,  // NFTA_CHAIN_USE
        10: .u32,  // NFTA_CHAIN_FLAGS
        11: .u32,  // NFTA_CHAIN_ID
        2: .u64,  // NFTA_CHAIN_HANDLE
        12: .binary,  // NFTA_CHAIN_USERDATA
    ])

    static let setDescription = Policy(attributes: [
        1: .u32,  // NFTA_SET_DESC_SIZE
        2: .concat,  // NFTA_SET_DESC_CONCAT
    ])

    static let set = Policy(attributes: [
        1: .string,  // NFTA_SET_TABLE
        2: .string,  // NFTA_SET_NAME
        16: .u64,  // NFTA_SET_HANDLE
        3: .u32,  // NFTA_SET_FLAGS
        4: .u32,  // NFTA_SET_KEY_TYPE
        5: .u32,  // NFTA_SET_KEY_LEN
        6: .u32,  // NFTA_SET_DATA_TYPE
        7: .u32,  // NFTA_SET_DATA_LEN
        10: .u32,  // NFTA_SET_ID
        8: .u32,  // NFTA_SET_POLICY
        12: .u32,  // NFTA_SET_GC_INTERVAL
        13: .binary,  // NFTA_SET_USERDATA
        11: .u64,  // NFTA_SET_TIMEOUT
        9: .object(setDescription),  // NFTA_SET_DESC
        17: .expression,  // NFTA_SET_EXPR
        18: .expressions,  // NFTA_SET_EXPRESSIONS
    ])

    /// libnftnl 1.2.4 knows element attributes up to NFTA_SET_ELEM_EXPRESSIONS (11).
    static let element = Policy(attributes: [
        3: .u32,  // NFTA_SET_ELEM_FLAGS
        4: .u64,  // NFTA_SET_ELEM_TIMEOUT
        5: .u64,  // NFTA_SET_ELEM_EXPIRATION
        1: .data,  // NFTA_SET_ELEM_KEY
        10: .data,  // NFTA_SET_ELEM_KEY_END
        2: .data,  // NFTA_SET_ELEM_DATA
        7: .expression,  // NFTA_SET_ELEM_EXPR
        11: .expressions,  // NFTA_SET_ELEM_EXPRESSIONS
        6: .binary,  // NFTA_SET_ELEM_USERDATA
    ], rejectAbove: 11)

    static let elementList = Policy(attributes: [
        1: .string,  // NFTA_SET_ELEM_LIST_TABLE
        2: .string,  // NFTA_SET_ELEM_LIST_SET
        3: .elements,  // NFTA_SET_ELEM_LIST_ELEMENTS
    ])

    static let data = Policy(attributes: [
        1: .binary,  // NFTA_DATA_VALUE
        2: .verdict,  // NFTA_DATA_VERDICT
    ])

    static let verdict = Policy(attributes: [
        1: .u32,  // NFTA_VERDICT_CODE
        3: .u32,  // NFTA_VERDICT_CHAIN_ID
        2: .string,  // NFTA_VERDICT_CHAIN
    ])

    static let ruleCompat = Policy(attributes: [
        1: .u32,  // NFTA_RULE_COMPAT_PROTO
        2: .u32,  // NFTA_RULE_COMPAT_FLAGS
    ])

    static let rule = Policy(attributes: [
        1: .string,  // NFTA_RULE_TABLE
        2: .string,  // NFTA_RULE_CHAIN
        3: .u64,  // NFTA_RULE_HANDLE
        5: .object(ruleCompat),  // NFTA_RULE_COMPAT
        6: .u64,  // NFTA_RULE_POSITION
        7: .binary,  // NFTA_RULE_USERDATA
        9: .u32,  // NFTA_RULE_ID
        10: .u32,  // NFTA_RULE_POSITION_ID
        4: .expressions,  // NFTA_RULE_EXPRESSIONS
    ])

    static let generation = Policy(attributes: [
        1: .u32,  // NFTA_GEN_ID
    ])

    static let expression = Policy(attributes: [
        1: .string,  // NFTA_EXPR_NAME
        2: .nested,  // NFTA_EXPR_DATA
    ])

    /// The data of each expression libnftnl knows, by name.
    static let expressions: [String: Policy] = [
        "bitwise": Policy(attributes: [1: .u32, 2: .u32, 6: .u32, 3: .u32, 4: .data, 5: .data, 7: .data]),  // NFTA_BITWISE_SREG, NFTA_BITWISE_DREG, NFTA_BITWISE_OP, NFTA_BITWISE_LEN, NFTA_BITWISE_MASK, NFTA_BITWISE_XOR, NFTA_BITWISE_DATA
        "byteorder": Policy(attributes: [1: .u32, 2: .u32, 3: .u32, 4: .u32, 5: .u32]),  // NFTA_BYTEORDER_SREG, NFTA_BYTEORDER_DREG, NFTA_BYTEORDER_OP, NFTA_BYTEORDER_LEN, NFTA_BYTEORDER_SIZE
        "cmp": Policy(attributes: [1: .u32, 2: .u32, 3: .data]),  // NFTA_CMP_SREG, NFTA_CMP_OP, NFTA_CMP_DATA
        "connlimit": Policy(attributes: [1: .u32, 2: .u32]),  // NFTA_CONNLIMIT_COUNT, NFTA_CONNLIMIT_FLAGS
        "counter": Policy(attributes: [1: .u64, 2: .u64]),  // NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS
        "ct": Policy(attributes: [2: .u32, 1: .u32, 4: .u32, 3: .u8]),  // NFTA_CT_KEY, NFTA_CT_DREG, NFTA_CT_SREG, NFTA_CT_DIRECTION
        "dup": Policy(attributes: [1: .u32, 2: .u32]),  // NFTA_DUP_SREG_ADDR, NFTA_DUP_SREG_DEV
        "dynset": Policy(attributes: [4: .u32, 5: .u32, 2: .u32, 3: .u32, 9: .u32, 6: .u64, 1: .string, 7: .expression, 10: .expressions]),  // NFTA_DYNSET_SREG_KEY, NFTA_DYNSET_SREG_DATA, NFTA_DYNSET_SET_ID, NFTA_DYNSET_OP, NFTA_DYNSET_FLAGS, NFTA_DYNSET_TIMEOUT, NFTA_DYNSET_SET_NAME, NFTA_DYNSET_EXPR, NFTA_DYNSET_EXPRESSIONS
        "exthdr": Policy(attributes: [2: .u8, 1: .u32, 7: .u32, 3: .u32, 4: .u32, 6: .u32, 5: .u32]),  // NFTA_EXTHDR_TYPE, NFTA_EXTHDR_DREG, NFTA_EXTHDR_SREG, NFTA_EXTHDR_OFFSET, NFTA_EXTHDR_LEN, NFTA_EXTHDR_OP, NFTA_EXTHDR_FLAGS
        "fib": Policy(attributes: [2: .u32, 1: .u32, 3: .u32]),  // NFTA_FIB_RESULT, NFTA_FIB_DREG, NFTA_FIB_FLAGS
        "flow_offload": Policy(attributes: [1: .string]), // NFTA_FLOW_TABLE_NAME
        "fwd": Policy(attributes: [1: .u32, 2: .u32, 3: .u32]),  // NFTA_FWD_SREG_DEV, NFTA_FWD_SREG_ADDR, NFTA_FWD_NFPROTO
        "hash": Policy(attributes: [1: .u32, 2: .u32, 3: .u32, 4: .u32, 5: .u32, 6: .u32, 7: .u32]),  // NFTA_HASH_SREG, NFTA_HASH_DREG, NFTA_HASH_LEN, NFTA_HASH_MODULUS, NFTA_HASH_SEED, NFTA_HASH_OFFSET, NFTA_HASH_TYPE
        "immediate": Policy(attributes: [1: .u32, 2: .data]),  // NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA
        "last": Policy(attributes: [2: .u64, 1: .u32]),  // NFTA_LAST_MSECS, NFTA_LAST_SET
        "limit": Policy(attributes: [1: .u64, 2: .u64, 3: .u32, 4: .u32, 5: .u32]),  // NFTA_LIMIT_RATE, NFTA_LIMIT_UNIT, NFTA_LIMIT_BURST, NFTA_LIMIT_TYPE, NFTA_LIMIT_FLAGS
        "log": Policy(attributes: [2: .string, 1: .u16, 4: .u16, 3: .u32, 5: .u32, 6: .u32]),  // NFTA_LOG_PREFIX, NFTA_LOG_GROUP, NFTA_LOG_QTHRESHOLD, NFTA_LOG_SNAPLEN, NFTA_LOG_LEVEL, NFTA_LOG_FLAGS
        "lookup": Policy(attributes: [2: .u32, 3: .u32, 4: .u32, 5: .u32, 1: .string]),  // NFTA_LOOKUP_SREG, NFTA_LOOKUP_DREG, NFTA_LOOKUP_SET_ID, NFTA_LOOKUP_FLAGS, NFTA_LOOKUP_SET
        "masq": Policy(attributes: [2: .u32, 3: .u32, 1: .u32]),  // NFTA_MASQ_REG_PROTO_MIN, NFTA_MASQ_REG_PROTO_MAX, NFTA_MASQ_FLAGS
        "match": Policy(attributes: [1: .nulString, 2: .u32, 3: .binary]),  // NFTA_MATCH_NAME, NFTA_MATCH_REV, NFTA_MATCH_INFO
        "meta": Policy(attributes: [2: .u32, 1: .u32, 3: .u32]),  // NFTA_META_KEY, NFTA_META_DREG, NFTA_META_SREG
        "nat": Policy(attributes: [1: .u32, 2: .u32, 3: .u32, 4: .u32, 5: .u32, 6: .u32, 7: .u32]),  // NFTA_NAT_TYPE, NFTA_NAT_FAMILY, NFTA_NAT_REG_ADDR_MIN, NFTA_NAT_REG_ADDR_MAX, NFTA_NAT_REG_PROTO_MIN, NFTA_NAT_REG_PROTO_MAX, NFTA_NAT_FLAGS
        "numgen": Policy(attributes: [1: .u32, 2: .u32, 3: .u32, 4: .u32]),  // NFTA_NG_DREG, NFTA_NG_MODULUS, NFTA_NG_TYPE, NFTA_NG_OFFSET
        "objref": Policy(attributes: [1: .u32, 2: .string, 4: .string, 3: .u32, 5: .u32]),  // NFTA_OBJREF_IMM_TYPE, NFTA_OBJREF_IMM_NAME, NFTA_OBJREF_SET_NAME, NFTA_OBJREF_SET_SREG, NFTA_OBJREF_SET_ID
        "osf": Policy(attributes: [1: .u32, 3: .u32, 2: .u8]),  // NFTNL_EXPR_OSF_DREG, NFTNL_EXPR_OSF_FLAGS, NFTNL_EXPR_OSF_TTL
        "payload": Policy(attributes: [5: .u32, 1: .u32, 2: .u32, 3: .u32, 4: .u32, 6: .u32, 7: .u32, 8: .u32]),  // NFTA_PAYLOAD_SREG, NFTA_PAYLOAD_DREG, NFTA_PAYLOAD_BASE, NFTA_PAYLOAD_OFFSET, NFTA_PAYLOAD_LEN, NFTA_PAYLOAD_CSUM_TYPE, NFTA_PAYLOAD_CSUM_OFFSET, NFTA_PAYLOAD_CSUM_FLAGS
        "queue": Policy(attributes: [1: .u16, 2: .u16, 3: .u16, 4: .u32]),  // NFTA_QUEUE_NUM, NFTA_QUEUE_TOTAL, NFTA_QUEUE_FLAGS, NFTA_QUEUE_SREG_QNUM
        "quota": Policy(attributes: [1: .u64, 4: .u64, 2: .u32]),  // NFTA_QUOTA_BYTES, NFTA_QUOTA_CONSUMED, NFTA_QUOTA_FLAGS
        "range": Policy(attributes: [1: .u32, 2: .u32, 3: .data, 4: .data]),  // NFTA_RANGE_SREG, NFTA_RANGE_OP, NFTA_RANGE_FROM_DATA, NFTA_RANGE_TO_DATA
        "redir": Policy(attributes: [1: .u32, 2: .u32, 3: .u32]),  // NFTA_REDIR_REG_PROTO_MIN, NFTA_REDIR_REG_PROTO_MAX, NFTA_REDIR_FLAGS
        "reject": Policy(attributes: [1: .u32, 2: .u8]),  // NFTA_REJECT_TYPE, NFTA_REJECT_ICMP_CODE
        "rt": Policy(attributes: [2: .u32, 1: .u32]),  // NFTA_RT_KEY, NFTA_RT_DREG
        "socket": Policy(attributes: [1: .u32, 2: .u32, 3: .u32]),  // NFTA_SOCKET_KEY, NFTA_SOCKET_DREG, NFTA_SOCKET_LEVEL
        "synproxy": Policy(attributes: [1: .u16, 2: .u8, 3: .u32]),  // NFTNL_EXPR_SYNPROXY_MSS, NFTNL_EXPR_SYNPROXY_WSCALE, NFTNL_EXPR_SYNPROXY_FLAGS
        "target": Policy(attributes: [1: .nulString, 2: .u32, 3: .binary]),  // NFTA_TARGET_NAME, NFTA_TARGET_REV, NFTA_TARGET_INFO
        "tproxy": Policy(attributes: [1: .u32, 2: .u32, 3: .u32]),  // NFTA_TPROXY_FAMILY, NFTA_TPROXY_REG_ADDR, NFTA_TPROXY_REG_PORT
        "tunnel": Policy(attributes: [1: .u32, 2: .u32]),  // NFTA_TUNNEL_KEY, NFTA_TUNNEL_DREG
        "xfrm": Policy(attributes: [1: .u32, 2: .u32, 4: .u32, 3: .u8]),  // NFTA_XFRM_DREG, NFTA_XFRM_KEY, NFTA_XFRM_SPNUM, NFTA_XFRM_DIR
    ]

    /// Nests deeper than this are refused (the kernel's go five deep: rule, expressions, expression, data,
    /// verdict); it bounds the recursion here and in libnftnl.
    static let maximumDepth = 12

    /// Whether the attributes of the message `h` (after its nfgenmsg) pass libnftnl's checks for `policy`.
    static func accepts(_ b: [UInt8], _ h: NetlinkHeader, _ policy: Policy) -> Bool {
        let start = h.offset + NetlinkWire.headerLength + 4
        guard h.offset >= 0, start <= h.offset + h.length, h.offset + h.length <= b.count else { return false }
        return accepts(b, start..<(h.offset + h.length), policy, depth: 0)
    }

    static func accepts(_ b: [UInt8], _ range: Range<Int>, _ policy: Policy, depth: Int) -> Bool {
        guard depth <= maximumDepth else { return false }
        for attr in NetlinkParse.attributes(in: b, range) {
            if let limit = policy.rejectAbove, attr.type > limit { return false }
            guard let kind = policy.attributes[attr.type] else { continue }
            guard accepts(b, attr.value, kind, depth: depth) else { return false }
        }
        return true
    }

    private static func accepts(_ b: [UInt8], _ value: Range<Int>, _ kind: Kind, depth: Int) -> Bool {
        let n = value.count
        switch kind {
        // libmnl wants integers of exactly their size.
        case .u8: return n == 1
        case .u16: return n == 2
        case .u32: return n == 4
        case .u64: return n == 8
        case .string: return n > 0
        case .nulString: return n > 0 && b[value.upperBound - 1] == 0
        case .binary: return true
        case .nested: return n == 0 || n >= 4
        default: break
        }
        // Every other kind is a nest libnftnl goes on to parse.
        guard n == 0 || n >= 4 else { return false }
        switch kind {
        case .object(let policy):
            return accepts(b, value, policy, depth: depth + 1)
        case .data:
            // Neither a value nor a verdict: nftnl_parse_data leaves the type of the previous nest it read (a
            // set element's key) in place, and the element then claims a verdict chain that is NULL.
            return accepts(b, value, data, depth: depth + 1) && NetlinkParse.attributes(in: b, value).contains { $0.type == 1 || $0.type == 2 }
        case .verdict:
            // nftnl_parse_verdict reads its table uninitialized: the code must be there, and the chain for
            // a jump or goto.
            guard accepts(b, value, verdict, depth: depth + 1) else { return false }
            let attrs = NetlinkParse.attributes(in: b, value)
            guard let code = attrs.last(where: { $0.type == a(NFTA_VERDICT_CODE) }) else { return false }
            let c = Int32(bitPattern: b[code.value].prefix(4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
            return (c != Nft.verdictJump && c != Nft.verdictGoto) || attrs.contains { $0.type == a(NFTA_VERDICT_CHAIN) }
        case .expression:
            guard accepts(b, value, expression, depth: depth + 1) else { return false }
            let attrs = NetlinkParse.attributes(in: b, value)
            // The name must be there (libnftnl looks it up without checking) and end in a NUL (so that the
            // name read here is the one libnftnl reads).
            guard let name = attrs.last(where: { $0.type == a(NFTA_EXPR_NAME) }), b[name.value].last == 0 else { return false }
            guard let dataPolicy = expressions[String(decoding: b[name.value].dropLast(), as: UTF8.self)] else { return true }
            return attrs.filter { $0.type == a(NFTA_EXPR_DATA) }.allSatisfy { accepts(b, $0.value, dataPolicy, depth: depth + 1) }
        case .expressions:
            return NetlinkParse.attributes(in: b, value).filter { $0.type == a(NFTA_LIST_ELEM) }
                .allSatisfy { accepts(b, $0.value, .expression, depth: depth + 1) }
        case .elements:
            return NetlinkParse.attributes(in: b, value).filter { $0.type == a(NFTA_LIST_ELEM) }
                .allSatisfy { accepts(b, $0.value, .object(element), depth: depth + 1) }
        case .concat:
            // libnftnl stores the field lengths in an array of NFT_REG32_COUNT (16).
            var fields = 0
            for item in NetlinkParse.attributes(in: b, value) where item.type == a(NFTA_LIST_ELEM) {
                for f in NetlinkParse.attributes(in: b, item.value) where f.type == a(NFTA_SET_FIELD_LEN) {
                    guard f.value.count == 4 else { return false }
                    fields += 1
                }
            }
            return fields <= 16
        default:
            return true
        }
    }
}
