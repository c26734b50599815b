// The only Swift file that touches C: the netlink socket (and entering a network namespace for it), and
// libnftnl to encode the pure `NftOperation`s into nf_tables messages and to decode dumps back into the
// pure model. Every unsafe pointer of the backend lives here.
import CNetfilter
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// MARK: - Namespaces

enum NamespaceSyscalls {
    /// Moves the calling thread into the network namespace at `path`.
    static func enterNetworkNamespace(path: String) throws(NetlinkError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            throw NetlinkError(kind: e == EPERM || e == EACCES ? .permissionDenied : .namespace, operation: "opening network namespace \(path)",
                               errno: e, message: String(cString: strerror(e)))
        }
        defer { close(fd) }
        guard hnd_setns_net(fd) == 0 else {
            let e = hnd_errno()
            throw NetlinkError(kind: e == EPERM || e == EACCES ? .permissionDenied : .namespace, operation: "entering network namespace \(path)",
                               errno: e, message: String(cString: strerror(e)))
        }
    }
}

// MARK: - Socket

/// A NETLINK_NETFILTER socket. Its network namespace is the one of the thread that created it.
final class NetlinkSocket {
    private let fd: Int32
    private(set) var portID: UInt32 = 0
    private var receiveBuffer: [UInt8]
    /// Called with every datagram `receive` returns: tests record the kernel's answers with it (the fuzz
    /// targets' seed corpus, replayed through `NetlinkReplay`).
    var tap: (([UInt8]) -> Void)?

    init() throws(NetlinkError) {
        let s = socket(AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), NETLINK_NETFILTER)
        guard s >= 0 else {
            let e = errno
            throw NetlinkError(kind: NetlinkError.kind(errno: e, operation: nil), operation: "opening a netfilter netlink socket",
                               errno: e, message: NetlinkSocket.describe(e))
        }
        fd = s
        receiveBuffer = [UInt8](repeating: 0, count: 1 << 20)
        var addr = sockaddr_nl()
        addr.nl_family = sa_family_t(AF_NETLINK)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_nl>.size)) }
        }
        guard rc == 0 else {
            let e = errno
            close(s)
            throw NetlinkError(kind: .io, operation: "binding the netlink socket", errno: e, message: NetlinkSocket.describe(e))
        }
        var bound = sockaddr_nl()
        var len = socklen_t(MemoryLayout<sockaddr_nl>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(s, $0, &len) }
        }
        portID = bound.nl_pid
        OwnNetlinkPorts.shared.add(portID)
        // Errors carry only the failing message's header plus the kernel's explanation and offset.
        setOption(level: SOL_NETLINK, name: hnd_netlink_cap_ack(), value: 1)
        setOption(level: SOL_NETLINK, name: hnd_netlink_ext_ack(), value: 1)
    }

    deinit { close(fd) }

    @discardableResult
    private func setOption(level: Int32, name: Int32, value: Int32) -> Bool {
        var v = value
        return setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size)) == 0
    }

    /// Raises the socket buffers (the FORCE variants ignore net.core.*mem_max; they need CAP_NET_ADMIN).
    func raiseBuffers(send: Int, receive: Int) {
        let snd = Int32(clamping: send), rcv = Int32(clamping: receive)
        if !setOption(level: SOL_SOCKET, name: SO_SNDBUFFORCE, value: snd) { setOption(level: SOL_SOCKET, name: SO_SNDBUF, value: snd) }
        if !setOption(level: SOL_SOCKET, name: SO_RCVBUFFORCE, value: rcv) { setOption(level: SOL_SOCKET, name: SO_RCVBUF, value: rcv) }
    }

    /// Joins the nf_tables notification group (NFNLGRP_NFTABLES): the kernel then sends this socket every
    /// committed change of the namespace's ruleset, each transaction closed by NFT_MSG_NEWGEN.
    func joinNftablesNotifications() throws(NetlinkError) {
        guard setOption(level: SOL_NETLINK, name: NETLINK_ADD_MEMBERSHIP, value: Int32(NFNLGRP_NFTABLES.rawValue)) else {
            let e = errno
            throw NetlinkError(kind: NetlinkError.kind(errno: e, operation: nil), operation: "subscribing to nftables notifications",
                               errno: e, message: NetlinkSocket.describe(e))
        }
    }

    /// Waits until the socket is readable, `timeoutMilliseconds` pass (-1: no limit) or `stop` is signalled.
    /// True when there is something to read.
    func waitReadable(timeoutMilliseconds: Int32, stop: StopSignal) throws(NetlinkError) -> Bool {
        var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: stop.readFD, events: Int16(POLLIN), revents: 0)]
        while true {
            let r = poll(&fds, 2, timeoutMilliseconds)
            if r < 0 {
                if errno == EINTR { continue }
                let e = errno
                throw NetlinkError(kind: .io, operation: "waiting for nftables notifications", errno: e, message: NetlinkSocket.describe(e))
            }
            if r == 0 || fds[1].revents != 0 { return false }
            return fds[0].revents != 0
        }
    }

    /// Sends `bytes` as one datagram (a whole batch is one sendmsg; the kernel processes it before returning).
    func send(_ bytes: [UInt8], what: String) throws(NetlinkError) {
        var dest = sockaddr_nl()
        dest.nl_family = sa_family_t(AF_NETLINK)
        let n: Int = bytes.withUnsafeBytes { buf in
            withUnsafeMutablePointer(to: &dest) { d in
                var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: buf.baseAddress), iov_len: buf.count)
                return withUnsafeMutablePointer(to: &iov) { iovp in
                    var msg = msghdr()
                    msg.msg_name = UnsafeMutableRawPointer(d)
                    msg.msg_namelen = socklen_t(MemoryLayout<sockaddr_nl>.size)
                    msg.msg_iov = iovp
                    msg.msg_iovlen = 1
                    return sendmsg(fd, &msg, 0)
                }
            }
        }
        guard n == bytes.count else {
            let e = n < 0 ? errno : EIO
            throw NetlinkError(kind: NetlinkError.kind(errno: e, operation: nil), operation: what, errno: e,
                               message: NetlinkSocket.describe(e) + (e == EMSGSIZE ? " (batch of \(bytes.count) bytes)" : ""))
        }
    }

    /// One datagram, or nil when nothing arrives within `timeoutMilliseconds` (0: do not wait).
    func receive(timeoutMilliseconds: Int32) throws(NetlinkError) -> [UInt8]? {
        while true {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, timeoutMilliseconds)
            if r < 0 {
                if errno == EINTR { continue }
                let e = errno
                throw NetlinkError(kind: .io, operation: "waiting for the kernel's answer", errno: e, message: NetlinkSocket.describe(e))
            }
            if r == 0 { return nil }
            let capacity = receiveBuffer.count
            let n = receiveBuffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, capacity, Int32(MSG_DONTWAIT) | Int32(MSG_TRUNC)) }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK { return nil }
                throw NetlinkError(kind: .io, operation: "reading the kernel's answer", errno: e,
                                   message: NetlinkSocket.describe(e) + (e == ENOBUFS ? " (replies were lost: the receive buffer overflowed)" : ""))
            }
            if n > capacity {
                // A bigger datagram than the buffer: grow and let the caller retry is impossible (it is gone).
                throw NetlinkError(kind: .io, operation: "reading the kernel's answer", errno: EMSGSIZE,
                                   message: "a netlink message of \(n) bytes did not fit the \(capacity)-byte buffer")
            }
            let datagram = Array(receiveBuffer[0..<n])
            tap?(datagram)
            return datagram
        }
    }

    static func describe(_ e: Int32) -> String {
        "\(String(cString: strerror(e))) (\(NetlinkError.errnoName(e)))"
    }
}

/// A pipe that wakes a thread blocked in `NetlinkSocket.waitReadable` (NftablesChangeMonitor.stop). Once
/// signalled it stays signalled.
final class StopSignal: @unchecked Sendable {
    let readFD: Int32
    private let writeFD: Int32

    init() throws(NetlinkError) {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else {
            let e = errno
            throw NetlinkError(kind: .io, operation: "creating a pipe", errno: e, message: NetlinkSocket.describe(e))
        }
        for f in fds { _ = fcntl(f, F_SETFD, FD_CLOEXEC) }
        readFD = fds[0]; writeFD = fds[1]
    }

    func signal() {
        var byte: UInt8 = 1
        _ = write(writeFD, &byte, 1)
    }

    deinit { close(readFD); close(writeFD) }
}

/// Port ids of the netlink sockets this process opened (the most recent ones). nf_tables' notifications of
/// a transaction carry the port id of the socket that committed it, so a monitor can tell our own changes
/// from everyone else's, whichever thread or socket made them.
final class OwnNetlinkPorts: @unchecked Sendable {
    static let shared = OwnNetlinkPorts()
    private let lock = NSLock()
    private var recent: [UInt32] = []
    private var members: [UInt32: Int] = [:]
    /// Enough for every socket that could still have notifications in flight.
    private let limit = 4096

    func add(_ port: UInt32) {
        lock.lock(); defer { lock.unlock() }
        recent.append(port)
        members[port, default: 0] += 1
        if recent.count > limit {
            let old = recent.removeFirst()
            if let n = members[old], n > 1 { members[old] = n - 1 } else { members[old] = nil }
        }
    }

    func contains(_ port: UInt32) -> Bool {
        lock.lock(); defer { lock.unlock() }
        return members[port] != nil
    }
}

// MARK: - Encoding

/// Builds nf_tables messages with libnftnl into a scratch buffer and appends them to a byte array.
struct NftEncoder {
    /// Large enough for any single message we build (element lists are capped far below 64 KiB).
    private var scratch = [UInt8](repeating: 0, count: 256 * 1024)

    private static func attr(_ v: some BinaryInteger) -> UInt16 { UInt16(v) }

    private mutating func build(into out: inout [UInt8], _ body: (UnsafeMutablePointer<CChar>) -> UnsafeMutablePointer<nlmsghdr>?) {
        let count = scratch.count
        let bytes: ArraySlice<UInt8> = scratch.withUnsafeMutableBytes { raw -> ArraySlice<UInt8> in
            let base = raw.baseAddress!.assumingMemoryBound(to: CChar.self)
            memset(base, 0, 64)
            guard let nlh = body(base) else { return [] }
            let len = Int(nlh.pointee.nlmsg_len)
            precondition(len <= count, "netlink message larger than the encoder's scratch buffer")
            return ArraySlice(UnsafeRawBufferPointer(start: raw.baseAddress, count: len))
        }
        out.append(contentsOf: bytes)
        let pad = NetlinkWire.align4(out.count) - out.count
        if pad > 0 { out.append(contentsOf: [UInt8](repeating: 0, count: pad)) }
    }

    mutating func batchBegin(seq: UInt32, into out: inout [UInt8]) {
        build(into: &out) { nftnl_batch_begin($0, seq) }
    }

    mutating func batchEnd(seq: UInt32, into out: inout [UInt8]) {
        build(into: &out) { nftnl_batch_end($0, seq) }
    }

    /// A request without payload other than names (GET / dump requests).
    mutating func request(type: UInt16, family: UInt8, flags: Int32, seq: UInt32, table: String? = nil, chain: String? = nil,
                          set: String? = nil, into out: inout [UInt8]) {
        let msgType = UInt16(NFNL_SUBSYS_NFTABLES) << 8 | type
        build(into: &out) { buf in
            let nlh = nftnl_nlmsg_build_hdr(buf, msgType, UInt16(family), UInt16(flags), seq)!
            switch Int32(type) {
            case Int32(NFT_MSG_GETTABLE.rawValue):
                if let t = table {
                    let o = nftnl_table_alloc()!
                    nftnl_table_set_str(o, NftEncoder.attr(NFTNL_TABLE_NAME.rawValue), t)
                    nftnl_table_nlmsg_build_payload(nlh, o)
                    nftnl_table_free(o)
                }
            case Int32(NFT_MSG_GETCHAIN.rawValue):
                let o = nftnl_chain_alloc()!
                if let t = table { nftnl_chain_set_str(o, NftEncoder.attr(NFTNL_CHAIN_TABLE.rawValue), t) }
                if let c = chain { nftnl_chain_set_str(o, NftEncoder.attr(NFTNL_CHAIN_NAME.rawValue), c) }
                nftnl_chain_nlmsg_build_payload(nlh, o)
                nftnl_chain_free(o)
            case Int32(NFT_MSG_GETSET.rawValue):
                let o = nftnl_set_alloc()!
                if let t = table { nftnl_set_set_str(o, NftEncoder.attr(NFTNL_SET_TABLE.rawValue), t) }
                if let s = set { nftnl_set_set_str(o, NftEncoder.attr(NFTNL_SET_NAME.rawValue), s) }
                nftnl_set_nlmsg_build_payload(nlh, o)
                nftnl_set_free(o)
            case Int32(NFT_MSG_GETSETELEM.rawValue):
                let o = nftnl_set_alloc()!
                if let t = table { nftnl_set_set_str(o, NftEncoder.attr(NFTNL_SET_TABLE.rawValue), t) }
                if let s = set { nftnl_set_set_str(o, NftEncoder.attr(NFTNL_SET_NAME.rawValue), s) }
                nftnl_set_elems_nlmsg_build_payload(nlh, o)
                nftnl_set_free(o)
            case Int32(NFT_MSG_GETRULE.rawValue):
                let o = nftnl_rule_alloc()!
                if let t = table { nftnl_rule_set_str(o, NftEncoder.attr(NFTNL_RULE_TABLE.rawValue), t) }
                if let c = chain { nftnl_rule_set_str(o, NftEncoder.attr(NFTNL_RULE_CHAIN.rawValue), c) }
                nftnl_rule_nlmsg_build_payload(nlh, o)
                nftnl_rule_free(o)
            default:
                break
            }
            return nlh
        }
    }

    /// Appends the message for `op` (with NLM_F_ACK, so every message is answered) and returns its range.
    @discardableResult
    mutating func encode(_ op: NftOperation, seq: UInt32, into out: inout [UInt8]) -> Range<Int> {
        let start = out.count
        let ack = Int32(NLM_F_ACK)
        func hdr(_ buf: UnsafeMutablePointer<CChar>, _ type: nf_tables_msg_types, _ family: NftFamily, _ flags: Int32) -> UnsafeMutablePointer<nlmsghdr> {
            nftnl_nlmsg_build_hdr(buf, UInt16(NFNL_SUBSYS_NFTABLES) << 8 | UInt16(type.rawValue), UInt16(family.rawValue), UInt16(flags | ack), seq)!
        }
        switch op.kind {
        case .newTable(let t), .deleteTable(let t):
            let isNew: Bool
            if case .newTable = op.kind { isNew = true } else { isNew = false }
            build(into: &out) { buf in
                let nlh = isNew ? hdr(buf, NFT_MSG_NEWTABLE, t.family, Int32(NLM_F_CREATE)) : hdr(buf, NFT_MSG_DELTABLE, t.family, 0)
                let o = nftnl_table_alloc()!
                nftnl_table_set_str(o, NftEncoder.attr(NFTNL_TABLE_NAME.rawValue), t.name)
                if isNew { nftnl_table_set_u32(o, NftEncoder.attr(NFTNL_TABLE_FLAGS.rawValue), t.flags) }
                if isNew, let u = t.userdata {
                    u.withUnsafeBytes { _ = nftnl_table_set_data(o, NftEncoder.attr(NFTNL_TABLE_USERDATA.rawValue), $0.baseAddress, UInt32($0.count)) }
                }
                nftnl_table_nlmsg_build_payload(nlh, o)
                nftnl_table_free(o)
                return nlh
            }
        case .newChain(let c):
            let excl = op.exclusive ? Int32(NLM_F_EXCL) : 0
            build(into: &out) { buf in
                let nlh = hdr(buf, NFT_MSG_NEWCHAIN, c.family, Int32(NLM_F_CREATE) | excl)
                let o = nftnl_chain_alloc()!
                nftnl_chain_set_str(o, NftEncoder.attr(NFTNL_CHAIN_TABLE.rawValue), c.table)
                nftnl_chain_set_str(o, NftEncoder.attr(NFTNL_CHAIN_NAME.rawValue), c.name)
                if let b = c.base {
                    nftnl_chain_set_str(o, NftEncoder.attr(NFTNL_CHAIN_TYPE.rawValue), b.type)
                    nftnl_chain_set_u32(o, NftEncoder.attr(NFTNL_CHAIN_HOOKNUM.rawValue), b.hook)
                    nftnl_chain_set_s32(o, NftEncoder.attr(NFTNL_CHAIN_PRIO.rawValue), b.priority)
                    nftnl_chain_set_u32(o, NftEncoder.attr(NFTNL_CHAIN_POLICY.rawValue), UInt32(bitPattern: b.policy))
                }
                nftnl_chain_nlmsg_build_payload(nlh, o)
                nftnl_chain_free(o)
                return nlh
            }
        case .deleteChain(let c):
            build(into: &out) { buf in
                let nlh = hdr(buf, NFT_MSG_DELCHAIN, c.family, 0)
                let o = nftnl_chain_alloc()!
                nftnl_chain_set_str(o, NftEncoder.attr(NFTNL_CHAIN_TABLE.rawValue), c.table)
                nftnl_chain_set_str(o, NftEncoder.attr(NFTNL_CHAIN_NAME.rawValue), c.name)
                nftnl_chain_nlmsg_build_payload(nlh, o)
                nftnl_chain_free(o)
                return nlh
            }
        case .flushChain(let c):
            build(into: &out) { buf in
                let nlh = hdr(buf, NFT_MSG_DELRULE, c.family, 0)
                let o = nftnl_rule_alloc()!
                nftnl_rule_set_str(o, NftEncoder.attr(NFTNL_RULE_TABLE.rawValue), c.table)
                nftnl_rule_set_str(o, NftEncoder.attr(NFTNL_RULE_CHAIN.rawValue), c.name)
                nftnl_rule_nlmsg_build_payload(nlh, o)
                nftnl_rule_free(o)
                return nlh
            }
        case .deleteSet(let s):
            build(into: &out) { buf in
                let nlh = hdr(buf, NFT_MSG_DELSET, s.family, 0)
                let o = nftnl_set_alloc()!
                nftnl_set_set_str(o, NftEncoder.attr(NFTNL_SET_TABLE.rawValue), s.table)
                nftnl_set_set_str(o, NftEncoder.attr(NFTNL_SET_NAME.rawValue), s.name)
                nftnl_set_nlmsg_build_payload(nlh, o)
                nftnl_set_free(o)
                return nlh
            }
        case .deleteElements(let s, let elements):
            build(into: &out) { buf in
                let nlh = hdr(buf, NFT_MSG_DELSETELEM, s.family, 0)
                let o = NftEncoder.makeSet(s)
                for e in elements {
                    let x = nftnl_set_elem_alloc()!
                    e.key.withUnsafeBytes { _ = nftnl_set_elem_set(x, NftEncoder.attr(NFTNL_SET_ELEM_KEY), $0.baseAddress, UInt32($0.count)) }
                    // An interval element is named by its whole range (as nft deletes one).
                    if let k = e.keyEnd {
                        k.withUnsafeBytes { _ = nftnl_set_elem_set(x, NftEncoder.attr(NFTNL_SET_ELEM_KEY_END), $0.baseAddress, UInt32($0.count)) }
                    }
                    nftnl_set_elem_add(o, x)
                }
                nftnl_set_elems_nlmsg_build_payload(nlh, o)
                nftnl_set_free(o)
                return nlh
            }
        case .newSet(let s):
            let excl = op.exclusive ? Int32(NLM_F_EXCL) : 0
            build(into: &out) { buf in
                let nlh = hdr(buf, NFT_MSG_NEWSET, s.family, Int32(NLM_F_CREATE) | excl)
                let o = NftEncoder.makeSet(s)
                if let size = s.size { nftnl_set_set_u32(o, NftEncoder.attr(NFTNL_SET_DESC_SIZE.rawValue), size) }
                nftnl_set_set_u32(o, NftEncoder.attr(NFTNL_SET_FLAGS.rawValue), s.flags)
                nftnl_set_set_u32(o, NftEncoder.attr(NFTNL_SET_KEY_TYPE.rawValue), s.keyType)
                nftnl_set_set_u32(o, NftEncoder.attr(NFTNL_SET_KEY_LEN.rawValue), s.keyLength)
                if let t = s.dataType { nftnl_set_set_u32(o, NftEncoder.attr(NFTNL_SET_DATA_TYPE.rawValue), t) }
                if let l = s.dataLength { nftnl_set_set_u32(o, NftEncoder.attr(NFTNL_SET_DATA_LEN.rawValue), l) }
                if let t = s.timeout { nftnl_set_set_u64(o, NftEncoder.attr(NFTNL_SET_TIMEOUT.rawValue), t) }
                if let fields = s.concatFields {
                    fields.withUnsafeBytes { _ = nftnl_set_set_data(o, NftEncoder.attr(NFTNL_SET_DESC_CONCAT.rawValue), $0.baseAddress, UInt32($0.count)) }
                }
                if !s.userdata.isEmpty {
                    s.userdata.withUnsafeBytes { _ = nftnl_set_set_data(o, NftEncoder.attr(NFTNL_SET_USERDATA.rawValue), $0.baseAddress, UInt32($0.count)) }
                }
                nftnl_set_nlmsg_build_payload(nlh, o)
                nftnl_set_free(o)
                return nlh
            }
        case .newElements(let s, let elements):
            let excl = op.exclusive ? Int32(NLM_F_EXCL) : 0
            build(into: &out) { buf in
                let nlh = hdr(buf, NFT_MSG_NEWSETELEM, s.family, Int32(NLM_F_CREATE) | excl)
                let o = NftEncoder.makeSet(s)
                for e in elements {
                    let x = nftnl_set_elem_alloc()!
                    e.key.withUnsafeBytes { _ = nftnl_set_elem_set(x, NftEncoder.attr(NFTNL_SET_ELEM_KEY), $0.baseAddress, UInt32($0.count)) }
                    if let k = e.keyEnd {
                        k.withUnsafeBytes { _ = nftnl_set_elem_set(x, NftEncoder.attr(NFTNL_SET_ELEM_KEY_END), $0.baseAddress, UInt32($0.count)) }
                    }
                    if let d = e.data {
                        d.withUnsafeBytes { _ = nftnl_set_elem_set(x, NftEncoder.attr(NFTNL_SET_ELEM_DATA), $0.baseAddress, UInt32($0.count)) }
                    }
                    if let v = e.verdict {
                        nftnl_set_elem_set_u32(x, NftEncoder.attr(NFTNL_SET_ELEM_VERDICT), UInt32(bitPattern: v.code))
                        if let c = v.chain { nftnl_set_elem_set_str(x, NftEncoder.attr(NFTNL_SET_ELEM_CHAIN), c) }
                    }
                    if let u = e.userdata {
                        u.withUnsafeBytes { _ = nftnl_set_elem_set(x, NftEncoder.attr(NFTNL_SET_ELEM_USERDATA), $0.baseAddress, UInt32($0.count)) }
                    }
                    nftnl_set_elem_add(o, x)
                }
                nftnl_set_elems_nlmsg_build_payload(nlh, o)
                nftnl_set_free(o)
                return nlh
            }
        case .newRule(let r):
            build(into: &out) { buf in
                let nlh = hdr(buf, NFT_MSG_NEWRULE, r.family, Int32(NLM_F_CREATE | NLM_F_APPEND))
                let o = nftnl_rule_alloc()!
                nftnl_rule_set_str(o, NftEncoder.attr(NFTNL_RULE_TABLE.rawValue), r.table)
                nftnl_rule_set_str(o, NftEncoder.attr(NFTNL_RULE_CHAIN.rawValue), r.chain)
                if let u = r.userdata {
                    u.withUnsafeBytes { _ = nftnl_rule_set_data(o, NftEncoder.attr(NFTNL_RULE_USERDATA.rawValue), $0.baseAddress, UInt32($0.count)) }
                }
                for e in r.expressions { nftnl_rule_add_expr(o, NftEncoder.makeExpr(e)) }
                nftnl_rule_nlmsg_build_payload(nlh, o)
                nftnl_rule_free(o)
                return nlh
            }
        }
        return start..<out.count
    }

    private static func makeSet(_ s: NftSet) -> OpaquePointer {
        let o = nftnl_set_alloc()!
        nftnl_set_set_str(o, attr(NFTNL_SET_TABLE.rawValue), s.table)
        nftnl_set_set_str(o, attr(NFTNL_SET_NAME.rawValue), s.name)
        if let id = s.id { nftnl_set_set_u32(o, attr(NFTNL_SET_ID.rawValue), id) }
        return o
    }

    private static func setData(_ x: OpaquePointer, _ a: some BinaryInteger, _ bytes: [UInt8]) {
        bytes.withUnsafeBytes { _ = nftnl_expr_set(x, attr(a), $0.baseAddress, UInt32($0.count)) }
    }

    private static func makeExpr(_ e: NftExpr) -> OpaquePointer {
        let x = nftnl_expr_alloc(e.name)!
        func u32(_ a: some BinaryInteger, _ v: UInt32) { nftnl_expr_set_u32(x, attr(a), v) }
        switch e {
        case let .meta(key, dreg):
            u32(NFTNL_EXPR_META_KEY, key); u32(NFTNL_EXPR_META_DREG, dreg)
        case let .cmp(op, sreg, data):
            u32(NFTNL_EXPR_CMP_SREG, sreg); u32(NFTNL_EXPR_CMP_OP, op); setData(x, NFTNL_EXPR_CMP_DATA, data)
        case let .payload(base, offset, len, dreg):
            u32(NFTNL_EXPR_PAYLOAD_DREG, dreg); u32(NFTNL_EXPR_PAYLOAD_BASE, base)
            u32(NFTNL_EXPR_PAYLOAD_OFFSET, offset); u32(NFTNL_EXPR_PAYLOAD_LEN, len)
        case let .lookup(set, setID, sreg, dreg, flags):
            u32(NFTNL_EXPR_LOOKUP_SREG, sreg)
            if let d = dreg { u32(NFTNL_EXPR_LOOKUP_DREG, d) }
            nftnl_expr_set_str(x, attr(NFTNL_EXPR_LOOKUP_SET), set)
            if let id = setID { u32(NFTNL_EXPR_LOOKUP_SET_ID, id) }
            if let f = flags { u32(NFTNL_EXPR_LOOKUP_FLAGS, f) }
        case let .ct(key, dreg, direction):
            u32(NFTNL_EXPR_CT_KEY, key); u32(NFTNL_EXPR_CT_DREG, dreg)
            if let d = direction { nftnl_expr_set_u8(x, attr(NFTNL_EXPR_CT_DIR), d) }
        case let .bitwise(sreg, dreg, len, mask, xor):
            u32(NFTNL_EXPR_BITWISE_SREG, sreg); u32(NFTNL_EXPR_BITWISE_DREG, dreg); u32(NFTNL_EXPR_BITWISE_LEN, len)
            setData(x, NFTNL_EXPR_BITWISE_MASK, mask); setData(x, NFTNL_EXPR_BITWISE_XOR, xor)
        case let .numgen(dreg, modulus, type, offset):
            u32(NFTNL_EXPR_NG_DREG, dreg); u32(NFTNL_EXPR_NG_MODULUS, modulus)
            u32(NFTNL_EXPR_NG_TYPE, type); u32(NFTNL_EXPR_NG_OFFSET, offset)
        case let .immediate(dreg, data):
            u32(NFTNL_EXPR_IMM_DREG, dreg); setData(x, NFTNL_EXPR_IMM_DATA, data)
        case let .nat(type, family, addrMin, addrMax, protoMin, protoMax, flags):
            u32(NFTNL_EXPR_NAT_TYPE, type); u32(NFTNL_EXPR_NAT_FAMILY, family)
            if let r = addrMin { u32(NFTNL_EXPR_NAT_REG_ADDR_MIN, r) }
            if let r = addrMax { u32(NFTNL_EXPR_NAT_REG_ADDR_MAX, r) }
            if let r = protoMin { u32(NFTNL_EXPR_NAT_REG_PROTO_MIN, r) }
            if let r = protoMax { u32(NFTNL_EXPR_NAT_REG_PROTO_MAX, r) }
            if let f = flags { u32(NFTNL_EXPR_NAT_FLAGS, f) }
        case let .dynset(op, sreg, set, setID):
            u32(NFTNL_EXPR_DYNSET_OP, op); u32(NFTNL_EXPR_DYNSET_SREG_KEY, sreg)
            nftnl_expr_set_str(x, attr(NFTNL_EXPR_DYNSET_SET_NAME), set)
            if let id = setID { u32(NFTNL_EXPR_DYNSET_SET_ID, id) }
        case let .byteorder(sreg, dreg, op, len, size):
            u32(NFTNL_EXPR_BYTEORDER_SREG, sreg); u32(NFTNL_EXPR_BYTEORDER_DREG, dreg); u32(NFTNL_EXPR_BYTEORDER_OP, op)
            u32(NFTNL_EXPR_BYTEORDER_LEN, len); u32(NFTNL_EXPR_BYTEORDER_SIZE, size)
        case .masq:
            break
        case .other(let name):
            preconditionFailure("cannot encode expression \(name)")
        }
        return x
    }
}

// MARK: - Decoding

/// Decodes nf_tables messages (replies to GET / dump requests) with libnftnl into the pure model.
enum NftDecoder {
    private static func attr(_ v: some BinaryInteger) -> UInt16 { UInt16(v) }

    /// Hands libnftnl one message, when it passes the checks libnftnl would otherwise exit the process (or
    /// read out of bounds) over (`NftAttributeCheck`, with `policy`); nil when it does not, or when it is too
    /// short for its nfgenmsg, which every parser reads. A copy followed by zeros: libnftnl strdup()s string
    /// attributes without checking that they end in a NUL (libmnl's MNL_TYPE_STRING checks only the length),
    /// so an unterminated one would be read past the message's end.
    private static func withHeader<T>(_ b: [UInt8], _ h: NetlinkHeader, _ policy: NftAttributeCheck.Policy,
                                      _ body: (UnsafePointer<nlmsghdr>) -> T?) -> T? {
        guard h.length >= NetlinkWire.headerLength + 4, h.offset >= 0, h.offset <= b.count - h.length,
              NftAttributeCheck.accepts(b, h, policy) else { return nil }
        var message = Array(b[h.offset..<(h.offset + h.length)])
        message.append(contentsOf: [0, 0, 0, 0])
        return message.withUnsafeBytes { raw in body(raw.baseAddress!.assumingMemoryBound(to: nlmsghdr.self)) }
    }

    private static func family(_ b: [UInt8], _ h: NetlinkHeader) -> NftFamily? {
        guard h.length >= NetlinkWire.headerLength + 4 else { return nil }
        return NftFamily(rawValue: b[h.offset + NetlinkWire.headerLength])
    }

    private static func bytes(_ p: UnsafeRawPointer?, _ len: UInt32) -> [UInt8] {
        guard let p else { return [] }
        return Array(UnsafeRawBufferPointer(start: p, count: Int(len)))
    }

    private static func string(_ p: UnsafePointer<CChar>?) -> String { p.map { String(cString: $0) } ?? "" }

    static func generation(_ b: [UInt8], _ h: NetlinkHeader) -> UInt32? {
        withHeader(b, h, NftAttributeCheck.generation) { nlh in
            let g = nftnl_gen_alloc()!
            defer { nftnl_gen_free(g) }
            guard nftnl_gen_nlmsg_parse(nlh, g) >= 0 else { return nil }
            return nftnl_gen_get_u32(g, attr(NFTNL_GEN_ID))
        }
    }

    static func table(_ b: [UInt8], _ h: NetlinkHeader) -> NftTable? {
        guard let fam = family(b, h) else { return nil }
        return withHeader(b, h, NftAttributeCheck.table) { nlh in
            let o = nftnl_table_alloc()!
            defer { nftnl_table_free(o) }
            guard nftnl_table_nlmsg_parse(nlh, o) >= 0 else { return nil }
            var userdata: [UInt8]?
            if nftnl_table_is_set(o, attr(NFTNL_TABLE_USERDATA.rawValue)) {
                var len: UInt32 = 0
                let p = nftnl_table_get_data(o, attr(NFTNL_TABLE_USERDATA.rawValue), &len)
                userdata = bytes(p, len)
            }
            return NftTable(family: fam, name: string(nftnl_table_get_str(o, attr(NFTNL_TABLE_NAME.rawValue))),
                            flags: nftnl_table_get_u32(o, attr(NFTNL_TABLE_FLAGS.rawValue)), userdata: userdata)
        }
    }

    static func chain(_ b: [UInt8], _ h: NetlinkHeader) -> NftChain? {
        guard let fam = family(b, h) else { return nil }
        return withHeader(b, h, NftAttributeCheck.chain) { nlh in
            let o = nftnl_chain_alloc()!
            defer { nftnl_chain_free(o) }
            guard nftnl_chain_nlmsg_parse(nlh, o) >= 0 else { return nil }
            var base: NftBaseHook?
            if nftnl_chain_is_set(o, attr(NFTNL_CHAIN_HOOKNUM.rawValue)) {
                base = NftBaseHook(type: string(nftnl_chain_get_str(o, attr(NFTNL_CHAIN_TYPE.rawValue))),
                                   hook: nftnl_chain_get_u32(o, attr(NFTNL_CHAIN_HOOKNUM.rawValue)),
                                   priority: nftnl_chain_get_s32(o, attr(NFTNL_CHAIN_PRIO.rawValue)),
                                   policy: Int32(bitPattern: nftnl_chain_get_u32(o, attr(NFTNL_CHAIN_POLICY.rawValue))))
            }
            return NftChain(family: fam, table: string(nftnl_chain_get_str(o, attr(NFTNL_CHAIN_TABLE.rawValue))),
                            name: string(nftnl_chain_get_str(o, attr(NFTNL_CHAIN_NAME.rawValue))), base: base)
        }
    }

    static func set(_ b: [UInt8], _ h: NetlinkHeader) -> NftSet? {
        guard let fam = family(b, h) else { return nil }
        return withHeader(b, h, NftAttributeCheck.set) { nlh in
            let o = nftnl_set_alloc()!
            defer { nftnl_set_free(o) }
            guard nftnl_set_nlmsg_parse(nlh, o) >= 0 else { return nil }
            func u32(_ a: nftnl_set_attr) -> UInt32? {
                nftnl_set_is_set(o, attr(a.rawValue)) ? nftnl_set_get_u32(o, attr(a.rawValue)) : nil
            }
            var len: UInt32 = 0
            let ud = nftnl_set_get_data(o, attr(NFTNL_SET_USERDATA.rawValue), &len)
            return NftSet(family: fam, table: string(nftnl_set_get_str(o, attr(NFTNL_SET_TABLE.rawValue))),
                          name: string(nftnl_set_get_str(o, attr(NFTNL_SET_NAME.rawValue))), id: nil,
                          flags: u32(NFTNL_SET_FLAGS) ?? 0, keyType: u32(NFTNL_SET_KEY_TYPE) ?? 0,
                          keyLength: u32(NFTNL_SET_KEY_LEN) ?? 0, dataType: u32(NFTNL_SET_DATA_TYPE),
                          dataLength: u32(NFTNL_SET_DATA_LEN), size: u32(NFTNL_SET_DESC_SIZE),
                          userdata: bytes(ud, ud == nil ? 0 : len),
                          timeout: nftnl_set_is_set(o, attr(NFTNL_SET_TIMEOUT.rawValue)) ? nftnl_set_get_u64(o, attr(NFTNL_SET_TIMEOUT.rawValue)) : nil)
        }
    }

    /// (set name, elements) of one NEWSETELEM dump message.
    static func elements(_ b: [UInt8], _ h: NetlinkHeader) -> (String, [NftElement])? {
        withHeader(b, h, NftAttributeCheck.elementList) { nlh in
            let o = nftnl_set_alloc()!
            defer { nftnl_set_free(o) }
            guard nftnl_set_elems_nlmsg_parse(nlh, o) >= 0 else { return nil }
            var out: [NftElement] = []
            guard let it = nftnl_set_elems_iter_create(o) else { return nil }
            defer { nftnl_set_elems_iter_destroy(it) }
            while let x = nftnl_set_elems_iter_next(it) {
                var e = NftElement(key: [])
                var len: UInt32 = 0
                if nftnl_set_elem_is_set(x, attr(NFTNL_SET_ELEM_KEY)) {
                    let p = nftnl_set_elem_get(x, attr(NFTNL_SET_ELEM_KEY), &len)
                    e.key = bytes(p, len)
                }
                if nftnl_set_elem_is_set(x, attr(NFTNL_SET_ELEM_KEY_END)) {
                    let p = nftnl_set_elem_get(x, attr(NFTNL_SET_ELEM_KEY_END), &len)
                    e.keyEnd = bytes(p, len)
                }
                if nftnl_set_elem_is_set(x, attr(NFTNL_SET_ELEM_DATA)) {
                    let p = nftnl_set_elem_get(x, attr(NFTNL_SET_ELEM_DATA), &len)
                    e.data = bytes(p, len)
                }
                if nftnl_set_elem_is_set(x, attr(NFTNL_SET_ELEM_VERDICT)) {
                    let code = Int32(bitPattern: nftnl_set_elem_get_u32(x, attr(NFTNL_SET_ELEM_VERDICT)))
                    let chain = nftnl_set_elem_is_set(x, attr(NFTNL_SET_ELEM_CHAIN))
                        ? string(nftnl_set_elem_get_str(x, attr(NFTNL_SET_ELEM_CHAIN))) : nil
                    e.verdict = NftVerdict(code: code, chain: chain)
                }
                if nftnl_set_elem_is_set(x, attr(NFTNL_SET_ELEM_USERDATA)) {
                    let p = nftnl_set_elem_get(x, attr(NFTNL_SET_ELEM_USERDATA), &len)
                    e.userdata = bytes(p, len)
                }
                out.append(e)
            }
            return (string(nftnl_set_get_str(o, attr(NFTNL_SET_NAME.rawValue))), out)
        }
    }

    static func rule(_ b: [UInt8], _ h: NetlinkHeader) -> NftRule? {
        guard let fam = family(b, h) else { return nil }
        return withHeader(b, h, NftAttributeCheck.rule) { nlh in
            let o = nftnl_rule_alloc()!
            defer { nftnl_rule_free(o) }
            guard nftnl_rule_nlmsg_parse(nlh, o) >= 0 else { return nil }
            var exprs: [NftExpr] = []
            if let it = nftnl_expr_iter_create(o) {
                while let x = nftnl_expr_iter_next(it) { exprs.append(expression(x)) }
                nftnl_expr_iter_destroy(it)
            }
            var userdata: [UInt8]?
            if nftnl_rule_is_set(o, attr(NFTNL_RULE_USERDATA.rawValue)) {
                var len: UInt32 = 0
                let p = nftnl_rule_get_data(o, attr(NFTNL_RULE_USERDATA.rawValue), &len)
                userdata = bytes(p, len)
            }
            return NftRule(family: fam, table: string(nftnl_rule_get_str(o, attr(NFTNL_RULE_TABLE.rawValue))),
                           chain: string(nftnl_rule_get_str(o, attr(NFTNL_RULE_CHAIN.rawValue))), expressions: exprs,
                           userdata: userdata, handle: nftnl_rule_get_u64(o, attr(NFTNL_RULE_HANDLE.rawValue)))
        }
    }

    private static func expression(_ x: OpaquePointer) -> NftExpr {
        let name = string(nftnl_expr_get_str(x, attr(NFTNL_EXPR_NAME)))
        func u32(_ a: some BinaryInteger) -> UInt32? { nftnl_expr_is_set(x, attr(a)) ? nftnl_expr_get_u32(x, attr(a)) : nil }
        func data(_ a: some BinaryInteger) -> [UInt8] {
            guard nftnl_expr_is_set(x, attr(a)) else { return [] }
            var len: UInt32 = 0
            let p = nftnl_expr_get(x, attr(a), &len)
            return bytes(p, len)
        }
        switch name {
        case "meta":
            guard let k = u32(NFTNL_EXPR_META_KEY), let d = u32(NFTNL_EXPR_META_DREG) else { return .other("meta set") }
            return .meta(key: k, dreg: d)
        case "cmp":
            return .cmp(op: u32(NFTNL_EXPR_CMP_OP) ?? 0, sreg: u32(NFTNL_EXPR_CMP_SREG) ?? 0, data: data(NFTNL_EXPR_CMP_DATA))
        case "payload":
            guard let d = u32(NFTNL_EXPR_PAYLOAD_DREG) else { return .other("payload write") }
            return .payload(base: u32(NFTNL_EXPR_PAYLOAD_BASE) ?? 0, offset: u32(NFTNL_EXPR_PAYLOAD_OFFSET) ?? 0,
                            len: u32(NFTNL_EXPR_PAYLOAD_LEN) ?? 0, dreg: d)
        case "lookup":
            return .lookup(set: string(nftnl_expr_get_str(x, attr(NFTNL_EXPR_LOOKUP_SET))), setID: u32(NFTNL_EXPR_LOOKUP_SET_ID),
                           sreg: u32(NFTNL_EXPR_LOOKUP_SREG) ?? 0, dreg: u32(NFTNL_EXPR_LOOKUP_DREG), flags: u32(NFTNL_EXPR_LOOKUP_FLAGS))
        case "ct":
            guard let k = u32(NFTNL_EXPR_CT_KEY), let d = u32(NFTNL_EXPR_CT_DREG) else { return .other("ct set") }
            let dir: UInt8? = nftnl_expr_is_set(x, attr(NFTNL_EXPR_CT_DIR)) ? nftnl_expr_get_u8(x, attr(NFTNL_EXPR_CT_DIR)) : nil
            return .ct(key: k, dreg: d, direction: dir)
        case "bitwise":
            return .bitwise(sreg: u32(NFTNL_EXPR_BITWISE_SREG) ?? 0, dreg: u32(NFTNL_EXPR_BITWISE_DREG) ?? 0,
                            len: u32(NFTNL_EXPR_BITWISE_LEN) ?? 0, mask: data(NFTNL_EXPR_BITWISE_MASK), xor: data(NFTNL_EXPR_BITWISE_XOR))
        case "numgen":
            return .numgen(dreg: u32(NFTNL_EXPR_NG_DREG) ?? 0, modulus: u32(NFTNL_EXPR_NG_MODULUS) ?? 0,
                           type: u32(NFTNL_EXPR_NG_TYPE) ?? 0, offset: u32(NFTNL_EXPR_NG_OFFSET) ?? 0)
        case "immediate":
            guard nftnl_expr_is_set(x, attr(NFTNL_EXPR_IMM_DATA)) else { return .other("immediate verdict") }
            return .immediate(dreg: u32(NFTNL_EXPR_IMM_DREG) ?? 0, data: data(NFTNL_EXPR_IMM_DATA))
        case "nat":
            return .nat(type: u32(NFTNL_EXPR_NAT_TYPE) ?? 0, family: u32(NFTNL_EXPR_NAT_FAMILY) ?? 0,
                        addrMin: u32(NFTNL_EXPR_NAT_REG_ADDR_MIN), addrMax: u32(NFTNL_EXPR_NAT_REG_ADDR_MAX),
                        protoMin: u32(NFTNL_EXPR_NAT_REG_PROTO_MIN), protoMax: u32(NFTNL_EXPR_NAT_REG_PROTO_MAX),
                        flags: u32(NFTNL_EXPR_NAT_FLAGS))
        case "dynset":
            let timeout = nftnl_expr_is_set(x, attr(NFTNL_EXPR_DYNSET_TIMEOUT)) ? nftnl_expr_get_u64(x, attr(NFTNL_EXPR_DYNSET_TIMEOUT)) : 0
            let plain = timeout == 0 && [NFTNL_EXPR_DYNSET_SREG_DATA, NFTNL_EXPR_DYNSET_FLAGS]
                .allSatisfy { !nftnl_expr_is_set(x, attr($0)) || (u32($0) ?? 0) == 0 }
            guard plain, let sreg = u32(NFTNL_EXPR_DYNSET_SREG_KEY) else { return .other("dynset with options") }
            return .dynset(op: u32(NFTNL_EXPR_DYNSET_OP) ?? 0, sreg: sreg,
                           set: string(nftnl_expr_get_str(x, attr(NFTNL_EXPR_DYNSET_SET_NAME))), setID: u32(NFTNL_EXPR_DYNSET_SET_ID))
        case "byteorder":
            return .byteorder(sreg: u32(NFTNL_EXPR_BYTEORDER_SREG) ?? 0, dreg: u32(NFTNL_EXPR_BYTEORDER_DREG) ?? 0,
                              op: u32(NFTNL_EXPR_BYTEORDER_OP) ?? 0, len: u32(NFTNL_EXPR_BYTEORDER_LEN) ?? 0,
                              size: u32(NFTNL_EXPR_BYTEORDER_SIZE) ?? 0)
        case "masq":
            let anyAttr = [NFTNL_EXPR_MASQ_FLAGS, NFTNL_EXPR_MASQ_REG_PROTO_MIN, NFTNL_EXPR_MASQ_REG_PROTO_MAX]
                .contains { nftnl_expr_is_set(x, attr($0)) && (u32($0) ?? 0) != 0 }
            return anyAttr ? .other("masq with options") : .masq
        default:
            return .other(name)
        }
    }
}

// MARK: - Message type numbers

enum NftMessageType {
    static let newTable = UInt16(NFT_MSG_NEWTABLE.rawValue)
    static let getTable = UInt16(NFT_MSG_GETTABLE.rawValue)
    static let newChain = UInt16(NFT_MSG_NEWCHAIN.rawValue)
    static let getChain = UInt16(NFT_MSG_GETCHAIN.rawValue)
    static let newRule = UInt16(NFT_MSG_NEWRULE.rawValue)
    static let getRule = UInt16(NFT_MSG_GETRULE.rawValue)
    static let newSet = UInt16(NFT_MSG_NEWSET.rawValue)
    static let getSet = UInt16(NFT_MSG_GETSET.rawValue)
    static let newSetElem = UInt16(NFT_MSG_NEWSETELEM.rawValue)
    static let getSetElem = UInt16(NFT_MSG_GETSETELEM.rawValue)
    static let newGen = UInt16(NFT_MSG_NEWGEN.rawValue)
    static let getGen = UInt16(NFT_MSG_GETGEN.rawValue)
    static let subsystemShift = UInt16(NFNL_SUBSYS_NFTABLES) << 8
    static let flagDump = Int32(NLM_F_DUMP)
    static let flagAck = Int32(NLM_F_ACK)
}
