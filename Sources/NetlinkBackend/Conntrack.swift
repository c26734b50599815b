import Foundation
import NetAddress
import RulePlanning

/// What one `ConntrackTable.delete` did.
public struct ConntrackDeletionReport: Sendable, Equatable {
    /// Entries the kernel deleted.
    public var deleted = 0
    /// Entries that matched but were gone when their delete arrived (expired, or replaced by a newer entry
    /// with the same tuple, which is left alone).
    public var alreadyGone = 0
    /// Entries read from the kernel over all dumps (only those of the deletions' protocol when the kernel
    /// can filter, 5.8+).
    public var scanned = 0
    /// Dumps made: one per address family the deletions name, more when a dump matched more entries than
    /// one round may hold.
    public var dumps = 0
    /// The last round still matched more entries than it could hold: some matching entries may remain (the
    /// next call continues).
    public var incomplete = false

    public init() {}
}

/// The kernel's conntrack table over netlink (ctnetlink), in `namespace` (nil: the caller's own network
/// namespace): read entries, and delete the ones that a plan change left stale (`ConntrackCleanup`, after
/// each commit) or that a plan makes stale whatever came before (`ConntrackStaleness`, after a restart).
///
/// A node can hold hundreds of thousands of entries, so nothing keeps the whole table: a dump is parsed
/// datagram by datagram as it arrives and only matching entries are kept, at most
/// `maximumMatchesPerDump` of them; when a dump matches more, those are deleted and the table is dumped
/// again, at most `maximumRounds` times per call (then the report says `incomplete`).
public struct ConntrackTable: Sendable {
    public let namespace: NetworkNamespace?
    let maximumMatchesPerDump: Int
    let maximumRounds: Int

    public init(namespace: NetworkNamespace? = nil) {
        self.init(namespace: namespace, maximumMatchesPerDump: 65_536, maximumRounds: 8)
    }

    init(namespace: NetworkNamespace?, maximumMatchesPerDump: Int, maximumRounds: Int) {
        precondition(maximumMatchesPerDump > 0 && maximumRounds > 0)
        self.namespace = namespace; self.maximumMatchesPerDump = maximumMatchesPerDump; self.maximumRounds = maximumRounds
    }

    /// Deletes the entries that match any of `deletions` (see `ConntrackDeletion.matches`): one dump per
    /// address family the deletions name (not one per deletion), then the matching entries' deletes, a few
    /// hundred per datagram. Each delete names the entry's original tuple and id, so an entry that the
    /// client re-created meanwhile (already through the new rules) is not deleted; a matching entry that is
    /// already gone counts as `alreadyGone`, not as an error.
    public func delete(_ deletions: [ConntrackDeletion]) throws(NetlinkError) -> ConntrackDeletionReport {
        let selector = ConntrackSelector(deletions)
        guard !selector.isEmpty else { return ConntrackDeletionReport() }
        // ConntrackCleanup only makes UDP deletions; let the kernel filter by protocol whenever there is one.
        return try delete(families: selector.families, protocolNumber: selector.protocolNumbers.count == 1 ? selector.protocolNumbers.first : nil) {
            selector.match($0) != nil
        }
    }

    /// `delete(ConntrackCleanup.deletions(from: old, to: new))`: call it once `new` is committed.
    public func cleanUp(from old: RulePlan, to new: RulePlan) throws(NetlinkError) -> ConntrackDeletionReport {
        try delete(ConntrackCleanup.deletions(from: old, to: new))
    }

    /// Deletes every UDP entry that `plan` makes stale (`ConntrackStaleness`): for when the previous plan is
    /// unknown (after a restart), or as a periodic safety net, as kube-proxy reconciles. Same bounds as `delete`.
    public func deleteStale(for plan: RulePlan) throws(NetlinkError) -> ConntrackDeletionReport {
        let staleness = ConntrackStaleness(plan: plan)
        guard !staleness.isEmpty else { return ConntrackDeletionReport() }
        return try delete(families: staleness.families, protocolNumber: TransportProtocol.udp.number) { staleness.isStale($0) }
    }

    private func delete(families: Set<IPFamily>, protocolNumber: UInt8?, where selects: (ConntrackEntry) -> Bool) throws(NetlinkError) -> ConntrackDeletionReport {
        var report = ConntrackDeletionReport()
        var session = try ConntrackSession.open(in: namespace)
        for family in IPFamily.allCases where families.contains(family) {
            for round in 0..<maximumRounds {
                var matched: [ConntrackEntry] = []
                var capped = false
                let cap = maximumMatchesPerDump
                report.scanned += try session.dump(family: family, protocolNumber: protocolNumber) { entry in
                    guard selects(entry) else { return }
                    if matched.count < cap { matched.append(entry) } else { capped = true }
                }
                report.dumps += 1
                let result = try session.delete(matched)
                report.deleted += result.deleted
                report.alreadyGone += result.alreadyGone
                if !capped { break }
                if round == maximumRounds - 1 { report.incomplete = true }
            }
        }
        return report
    }

    /// The entries of `family` (nil: both) and `protocol` (nil: all protocols), in the kernel's order, at most
    /// `limit` of them (the rest of the dump is read and dropped). For status output and tests.
    public func entries(family: IPFamily? = nil, protocol: TransportProtocol? = .udp, limit: Int = 100_000) throws(NetlinkError) -> [ConntrackEntry] {
        var session = try ConntrackSession.open(in: namespace)
        var out: [ConntrackEntry] = []
        for f in IPFamily.allCases where family == nil || family == f {
            _ = try session.dump(family: f, protocolNumber: `protocol`?.number) { entry in
                if let p = `protocol`, entry.original.protocolNumber != p.number { return }
                if out.count < limit { out.append(entry) }
            }
        }
        return out
    }

    /// How an errno from ctnetlink is reported: EPERM / EACCES as a permission error (CAP_NET_ADMIN), and the
    /// answers of a kernel without conntrack over netlink as `.unavailable` (nfnetlink answers EINVAL for a
    /// subsystem it does not have: nf_conntrack_netlink not built or not loadable).
    static func error(errno e: Int32, operation: String) -> NetlinkError {
        switch e {
        case 1, 13:
            return NetlinkError(kind: .permissionDenied, operation: operation, errno: e, message: NetlinkSocket.describe(e))
        case 22, 93, 95, 97:
            return NetlinkError(kind: .unavailable, operation: operation, errno: e,
                                message: "conntrack over netlink is unavailable (the kernel needs nf_conntrack and nf_conntrack_netlink): "
                                    + NetlinkSocket.describe(e))
        default:
            return NetlinkError(kind: .rejected, operation: operation, errno: e, message: NetlinkSocket.describe(e))
        }
    }
}

/// Request / reply exchanges for ctnetlink on one NETLINK_NETFILTER socket (made in the namespace by
/// `NetlinkSession.open`).
struct ConntrackSession {
    let socket: NetlinkSocket
    private var nextSequence = UInt32.random(in: 1..<0x4000_0000)
    private var encoder = ConntrackEncoder()
    /// Deletes per datagram; their acks (a small skb each) must all fit the receive buffer.
    static let deletesPerDatagram = 256

    static func open(in namespace: NetworkNamespace?) throws(NetlinkError) -> ConntrackSession {
        let s = try NetlinkSession.open(in: namespace).socket
        s.raiseBuffers(send: 1 << 20, receive: 4 << 20)
        return ConntrackSession(socket: s)
    }

    private init(socket: NetlinkSocket) { self.socket = socket }

    private mutating func sequence(count: Int = 1) -> UInt32 {
        let s = nextSequence
        nextSequence &+= UInt32(count)
        return s
    }

    /// Dumps the `family` table and calls `visit` for each entry as its datagram arrives; returns how many
    /// entries were read. Asks the kernel to filter by `protocolNumber`; if it refuses the filter, dumps
    /// unfiltered (the caller filters anyway).
    mutating func dump(family: IPFamily, protocolNumber: UInt8?, _ visit: (ConntrackEntry) -> Void) throws(NetlinkError) -> Int {
        let what = "reading the \(family.rawValue) conntrack table"
        var filter = protocolNumber
        while true {
            let seq = sequence()
            var request: [UInt8] = []
            encoder.dumpRequest(family: family, protocolNumber: filter, seq: seq, into: &request)
            try socket.send(request, what: what)
            var scanned = 0
            guard let e = try receiveDump(seq: seq, what: what, scanned: &scanned, visit) else { return scanned }
            if filter != nil && scanned == 0 && (e == 22 || e == 95) {
                filter = nil  // a kernel that knows CTA_FILTER but refuses this one; without it, any kernel answers
                continue
            }
            throw ConntrackTable.error(errno: e, operation: what)
        }
    }

    /// Reads one dump's datagrams; nil at its end, or the errno it failed with.
    private func receiveDump(seq: UInt32, what: String, scanned: inout Int, _ visit: (ConntrackEntry) -> Void) throws(NetlinkError) -> Int32? {
        var reader = ConntrackDumpReader(sequence: seq)
        defer { scanned = reader.scanned }
        while true {
            guard let datagram = try socket.receive(timeoutMilliseconds: 10_000) else {
                throw NetlinkError(kind: .io, operation: what, errno: 110, message: "the kernel did not answer within 10 s")
            }
            switch reader.consume(datagram, visit) {
            case .more: continue
            case .finished: return nil
            case .failed(let e): return e
            }
        }
    }

    /// Deletes `entries`, `deletesPerDatagram` per sendmsg, each acked. ENOENT: already gone.
    mutating func delete(_ entries: [ConntrackEntry]) throws(NetlinkError) -> (deleted: Int, alreadyGone: Int) {
        var deleted = 0, gone = 0
        var start = 0
        while start < entries.count {
            let chunk = entries[start..<min(start + Self.deletesPerDatagram, entries.count)]
            start += chunk.count
            let seq0 = sequence(count: chunk.count)
            var bytes: [UInt8] = []
            bytes.reserveCapacity(chunk.count * 120)
            for (i, e) in chunk.enumerated() { encoder.entryMessage(e, seq: seq0 &+ UInt32(i), into: &bytes) }
            let what = "deleting \(chunk.count) conntrack entries"
            try socket.send(bytes, what: what)
            var answered = [Bool](repeating: false, count: chunk.count)
            var answeredCount = 0
            var failure: (index: Int, errno: Int32)?
            var waited: Int32 = 0
            while answeredCount < chunk.count {
                guard let datagram = try socket.receive(timeoutMilliseconds: 200) else {
                    waited += 200
                    if waited >= 5_000 { break }
                    continue
                }
                for h in NetlinkParse.messages(in: datagram) where h.type == NetlinkWire.nlmsgError {
                    guard let ack = NetlinkParse.ack(h, in: datagram) else { continue }
                    let i = Int(ack.sequence &- seq0)
                    guard i >= 0, i < chunk.count, !answered[i] else { continue }
                    answered[i] = true
                    answeredCount += 1
                    switch ack.errno {
                    case 0: deleted += 1
                    case 2: gone += 1
                    default: if failure == nil { failure = (i, ack.errno) }
                    }
                }
            }
            if let f = failure {
                let e = chunk[chunk.startIndex + f.index]
                throw ConntrackTable.error(errno: f.errno, operation: "deleting conntrack entry \(e)")
            }
            if answeredCount < chunk.count {
                throw NetlinkError(kind: .io, operation: what, errno: 5,
                                   message: "the kernel answered \(answeredCount) of \(chunk.count) deletes (\(deleted) deleted so far)")
            }
        }
        return (deleted, gone)
    }
}

/// One ctnetlink dump as its datagrams arrive: the entries of the messages with the request's sequence
/// number, up to NLMSG_DONE (whose payload carries the dump's result) or an NLMSG_ERROR. `ConntrackSession`
/// feeds it what the socket receives; the fuzz target (Tests/Fuzz/conntrack.swift) feeds it arbitrary bytes.
/// Entries are handed to the caller one by one, never collected. Pure.
struct ConntrackDumpReader {
    enum Progress: Equatable {
        case more
        case finished
        /// The dump failed with this errno.
        case failed(Int32)
    }

    let sequence: UInt32
    /// NEW messages seen (decodable or not).
    private(set) var scanned = 0

    init(sequence: UInt32) { self.sequence = sequence }

    mutating func consume(_ datagram: [UInt8], _ visit: (ConntrackEntry) -> Void) -> Progress {
        for h in NetlinkParse.messages(in: datagram) where h.sequence == sequence {
            switch h.type {
            case NetlinkWire.nlmsgError:
                let e = NetlinkParse.ack(h, in: datagram)?.errno ?? NetlinkWire.malformedErrno
                if e != 0 { return .failed(e) }
            case NetlinkWire.nlmsgDone:
                // The dump's own result travels in NLMSG_DONE's payload (a negative errno, 0 when it succeeded).
                if h.payload.count >= 4 {
                    let r = Int32(bitPattern: NetlinkWire.u32(datagram, h.payload.lowerBound))
                    if r < 0 { return .failed(r >= -4095 ? -r : NetlinkWire.malformedErrno) }
                }
                return .finished
            case Ctnl.msgNew:
                scanned += 1
                if let entry = ConntrackWire.entry(datagram, h) { visit(entry) }
            default:
                continue
            }
        }
        return .more
    }
}

/// Decodes ctnetlink messages from plain bytes (pure): the entries of a dump. Attributes of interest are
/// walked in place, without copying, since a dump can hold hundreds of thousands of entries.
enum ConntrackWire {
    /// An entry from an IPCTNL_MSG_CT_NEW message (a dump answer); nil for anything else or a malformed one.
    static func entry(_ b: [UInt8], _ h: NetlinkHeader) -> ConntrackEntry? {
        let attrs = h.offset + NetlinkWire.headerLength + 4  // nlmsghdr + nfgenmsg
        guard h.type == Ctnl.msgNew, h.offset + h.length <= b.count, attrs <= h.offset + h.length else { return nil }
        var original: ConntrackTuple?, reply: ConntrackTuple?
        var id: UInt32?
        var zone: UInt16 = 0
        forEachAttribute(b, attrs..<(h.offset + h.length)) { type, value in
            switch type {
            case Ctnl.tupleOrig: original = tuple(b, value)
            case Ctnl.tupleReply: reply = tuple(b, value)
            case Ctnl.id where value.count == 4: id = be32(b, value.lowerBound)
            case Ctnl.zone where value.count == 2: zone = be16(b, value.lowerBound)
            default: break
            }
        }
        guard let original, let reply else { return nil }
        return ConntrackEntry(original: original, reply: reply, id: id, zone: zone)
    }

    static func tuple(_ b: [UInt8], _ range: Range<Int>) -> ConntrackTuple? {
        var source: IPAddress?, destination: IPAddress?
        var protocolNumber: UInt8?
        var sourcePort: Int?, destinationPort: Int?
        forEachAttribute(b, range) { type, value in
            switch type {
            case Ctnl.tupleIP:
                forEachAttribute(b, value) { t, v in
                    switch (t, v.count) {
                    case (Ctnl.ipV4Src, 4): source = ipv4(b, v.lowerBound)
                    case (Ctnl.ipV4Dst, 4): destination = ipv4(b, v.lowerBound)
                    case (Ctnl.ipV6Src, 16): source = ipv6(b, v.lowerBound)
                    case (Ctnl.ipV6Dst, 16): destination = ipv6(b, v.lowerBound)
                    default: break
                    }
                }
            case Ctnl.tupleProto:
                forEachAttribute(b, value) { t, v in
                    switch (t, v.count) {
                    case (Ctnl.protoNum, 1...): protocolNumber = b[v.lowerBound]
                    case (Ctnl.protoSrcPort, 2): sourcePort = Int(be16(b, v.lowerBound))
                    case (Ctnl.protoDstPort, 2): destinationPort = Int(be16(b, v.lowerBound))
                    default: break
                    }
                }
            default:
                break
            }
        }
        guard let source, let destination, let protocolNumber, source.family == destination.family else { return nil }
        return ConntrackTuple(source: source, destination: destination, protocolNumber: protocolNumber,
                              sourcePort: sourcePort, destinationPort: destinationPort)
    }

    /// Calls `body(type, value range)` for each attribute in `range` (type without the NESTED / byte-order
    /// flags); stops at a malformed one.
    static func forEachAttribute(_ b: [UInt8], _ range: Range<Int>, _ body: (UInt16, Range<Int>) -> Void) {
        var i = range.lowerBound
        while i + 4 <= range.upperBound {
            let len = Int(NetlinkWire.u16(b, i))
            guard len >= 4, i + len <= range.upperBound else { return }
            body(NetlinkWire.u16(b, i + 2) & NetlinkWire.nlaTypeMask, (i + 4)..<(i + len))
            i += NetlinkWire.align4(len)
        }
    }

    static func be16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }
    static func be32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) << 24 | UInt32(b[at + 1]) << 16 | UInt32(b[at + 2]) << 8 | UInt32(b[at + 3])
    }
    static func ipv4(_ b: [UInt8], _ at: Int) -> IPAddress { IPAddress(ipv4: be32(b, at)) }
    static func ipv6(_ b: [UInt8], _ at: Int) -> IPAddress {
        var high: UInt64 = 0, low: UInt64 = 0
        for k in 0..<8 { high = high << 8 | UInt64(b[at + k]); low = low << 8 | UInt64(b[at + 8 + k]) }
        return IPAddress(ipv6: high, low)
    }
}
