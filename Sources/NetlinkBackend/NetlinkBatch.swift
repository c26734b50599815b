import Foundation

/// One nf_tables transaction: operations collected in order, sent as a single batch
/// (BATCH_BEGIN, messages, BATCH_END) in one sendmsg. The kernel commits all of it or nothing.
/// Every message gets its own sequence number and NLM_F_ACK, so that each one is answered; every
/// NLMSG_ERROR is mapped back through its sequence number to the operation (and, with the extended ack
/// offset, to the element or expression) that failed.
struct NetlinkBatch {
    private(set) var operations: [NftOperation] = []

    init(_ operations: [NftOperation] = []) { self.operations = operations }

    mutating func add(_ op: NftOperation) { operations.append(op) }

    var isEmpty: Bool { operations.isEmpty }

    struct Encoded {
        var bytes: [UInt8]
        var beginSequence: UInt32
        /// Byte range of each operation's message, by operation index.
        var ranges: [Range<Int>]
        func sequence(ofOperation i: Int) -> UInt32 { beginSequence &+ 1 &+ UInt32(i) }
        var endSequence: UInt32 { beginSequence &+ 1 &+ UInt32(ranges.count) }
    }

    func encode(beginSequence: UInt32) -> Encoded {
        var enc = NftEncoder()
        var bytes: [UInt8] = []
        bytes.reserveCapacity(operations.count * 256 + 64)
        enc.batchBegin(seq: beginSequence, into: &bytes)
        var ranges: [Range<Int>] = []
        ranges.reserveCapacity(operations.count)
        for (i, op) in operations.enumerated() {
            ranges.append(enc.encode(op, seq: beginSequence &+ 1 &+ UInt32(i), into: &bytes))
        }
        enc.batchEnd(seq: beginSequence &+ 1 &+ UInt32(operations.count), into: &bytes)
        return Encoded(bytes: bytes, beginSequence: beginSequence, ranges: ranges)
    }

    struct Result: Sendable {
        var messages: Int
        var bytes: Int
    }

    /// Sends the batch and waits for every answer. Throws the first failure (with the others attached).
    /// `beforeSending` runs once the batch is encoded, right before it is sent; when it throws, nothing is sent.
    func commit(on socket: NetlinkSocket, beforeSending: () throws(NetlinkError) -> Void = {}) throws(NetlinkError) -> Result {
        let seq0 = UInt32.random(in: 1..<0x4000_0000)
        let enc = encode(beginSequence: seq0)
        let n = operations.count
        // The whole batch is one datagram: the send buffer must hold it. Each answer is a small skb
        // (~1 KiB of truesize); the receive buffer must hold all of them, or answers are dropped (ENOBUFS).
        socket.raiseBuffers(send: enc.bytes.count + (1 << 16), receive: (1 << 20) + n * 1024)
        try beforeSending()
        // A socket that lives across batches (NftablesConnection) may still hold answers to an earlier
        // request that was abandoned after its first error; drop them (one poll when there are none).
        while try socket.receive(timeoutMilliseconds: 0) != nil {}
        try socket.send(enc.bytes, what: "sending the nftables batch (\(n) messages, \(enc.bytes.count) bytes)")

        var answers = BatchAnswers(enc)
        var waitedMilliseconds: Int32 = 0
        while !answers.isComplete {
            // The kernel handles the batch inside sendmsg, so the answers are normally queued already;
            // only wait (briefly) when some are still missing and nothing failed.
            let timeout: Int32 = answers.failed ? 0 : 200
            guard let datagram = try socket.receive(timeoutMilliseconds: timeout) else {
                if answers.failed { break }
                waitedMilliseconds += timeout
                if waitedMilliseconds >= 5000 { break }
                continue
            }
            answers.consume(datagram)
        }
        return try result(answers, enc)
    }

    /// What the answers say: the first failure (with the others attached) named by its operation, an I/O
    /// error when some messages went unanswered, else the batch's size. Pure.
    func result(_ answers: BatchAnswers, _ enc: Encoded) throws(NetlinkError) -> Result {
        let n = operations.count
        if !answers.failures.isEmpty {
            let failures = answers.failures.sorted { ($0.index ?? -1) < ($1.index ?? -1) }
            let described = failures.map { describe($0.index, $0.ack, enc) }
            let first = failures[0]
            let op = first.index.map { operations[$0] }
            throw NetlinkError(kind: NetlinkError.kind(errno: first.ack.errno, operation: op),
                                         operation: described[0].operation, errno: first.ack.errno,
                                         message: described[0].message,
                                         otherFailures: described.dropFirst().map { "\($0.operation ?? "the batch"): \($0.message)" })
        }
        if answers.answeredCount < n {
            throw NetlinkError(kind: .io, operation: "reading the answers to the nftables batch", errno: EIO,
                               message: "the kernel answered \(answers.answeredCount) of \(n) messages; the ruleset state is unknown")
        }
        return Result(messages: n + 2, bytes: enc.bytes.count)
    }

    private func describe(_ index: Int?, _ ack: NetlinkAck, _ enc: Encoded) -> (operation: String?, message: String) {
        var message = NetlinkSocket.describe(ack.errno)
        if let m = ack.extMessage, !m.isEmpty { message += ": \(m)" }
        guard let i = index else { return ("starting the nftables transaction", message) }
        let op = operations[i]
        var what = op.description
        if let off = ack.extOffset {
            let range = enc.ranges[i]
            let length = range.count
            switch op.kind {
            case .newElements(_, let elements), .deleteElements(_, let elements):
                let children = NetlinkParse.childRanges(ofMessageAt: range.lowerBound, length: length, in: enc.bytes, listType: 3)
                if let k = children.firstIndex(where: { $0.contains(off) }), k < elements.count {
                    what = op.elementDescription(k)
                }
            case .newRule:
                let children = NetlinkParse.childRanges(ofMessageAt: range.lowerBound, length: length, in: enc.bytes, listType: 4)
                if let k = children.firstIndex(where: { $0.contains(off) }), k < op.expressionDescriptions.count {
                    what += " (expression \(k + 1): \(op.expressionDescriptions[k]))"
                }
            default:
                break
            }
        }
        return (what, message)
    }
}

/// The kernel's answers to one encoded batch, as its datagrams arrive: which messages were answered (each
/// has NLM_F_ACK) and which failed, matched by sequence number; errors for BATCH_BEGIN or BATCH_END concern
/// the whole batch (`index` nil). `NetlinkBatch.commit` feeds it what the socket receives; the fuzz target
/// feeds it arbitrary bytes. Pure.
struct BatchAnswers {
    let beginSequence: UInt32
    let endSequence: UInt32
    private var answered: [Bool]
    private(set) var answeredCount = 0
    private(set) var failures: [(index: Int?, ack: NetlinkAck)] = []

    init(_ enc: NetlinkBatch.Encoded) {
        beginSequence = enc.beginSequence
        endSequence = enc.endSequence
        answered = [Bool](repeating: false, count: enc.ranges.count)
    }

    var isComplete: Bool { answeredCount == answered.count }
    var failed: Bool { !failures.isEmpty }

    mutating func consume(_ datagram: [UInt8]) {
        for h in NetlinkParse.messages(in: datagram) where h.type == NetlinkWire.nlmsgError {
            guard let ack = NetlinkParse.ack(h, in: datagram) else { continue }
            let rel = Int(ack.sequence &- beginSequence) - 1
            if rel >= 0 && rel < answered.count {
                if !answered[rel] { answered[rel] = true; answeredCount += 1 }
                if ack.errno != 0 { failures.append((rel, ack)) }
            } else if ack.errno != 0 && (ack.sequence == beginSequence || ack.sequence == endSequence) {
                failures.append((nil, ack))  // the batch itself (e.g. EPERM for the whole datagram)
            }
        }
    }
}

/// Request / reply exchanges on one socket: single GETs and dumps.
struct NetlinkSession {
    let socket: NetlinkSocket
    private var nextSequence = UInt32.random(in: 1..<0x4000_0000)
    private var encoder = NftEncoder()

    init(socket: NetlinkSocket) { self.socket = socket }

    enum Reply {
        case messages([([UInt8], NetlinkHeader)])
        case error(Int32)
    }

    struct DumpInterrupted: Error {}

    /// Sends one GET (dump when `dump`) and collects the answer. `DumpInterrupted` when the ruleset changed
    /// during the dump (the caller retries).
    mutating func request(_ type: UInt16, family: NftFamily?, dump: Bool, table: String? = nil, chain: String? = nil,
                          set: String? = nil) throws -> Reply {
        let seq = nextSequence
        nextSequence &+= 1
        var bytes: [UInt8] = []
        encoder.request(type: type, family: family?.rawValue ?? 0, flags: dump ? NftMessageType.flagDump : 0, seq: seq,
                    table: table, chain: chain, set: set, into: &bytes)
        try socket.send(bytes, what: "sending a netlink request")
        var collector = NetlinkReplyCollector(sequence: seq, dump: dump)
        while true {
            guard let d = try socket.receive(timeoutMilliseconds: 10_000) else {
                throw NetlinkError(kind: .io, operation: "reading a netlink reply", errno: 110 /* ETIMEDOUT */,
                                   message: "the kernel did not answer within 10 s")
            }
            if let reply = try collector.consume(d) { return reply }
        }
    }

    /// The generation in the answer to a GETGEN. Pure.
    static func generation(_ reply: Reply) throws(NetlinkError) -> UInt32 {
        switch reply {
        case .messages(let m):
            guard let (b, h) = m.first, let g = NftDecoder.generation(b, h) else {
                throw NetlinkError(kind: .io, operation: "reading the ruleset generation", errno: 5, message: "unexpected reply")
            }
            return g
        case .error(let e):
            throw NetlinkError(kind: NetlinkError.kind(errno: e, operation: nil), operation: "reading the ruleset generation",
                               errno: e, message: NetlinkSocket.describe(e))
        }
    }

    /// Opens a session in `namespace` (the socket is created on a thread inside it).
    static func open(in namespace: NetworkNamespace?) throws(NetlinkError) -> NetlinkSession {
        do {
            return NetlinkSession(socket: try namespace.run { try NetlinkSocket() })
        } catch let e as NetlinkError {
            throw e
        } catch {
            throw NetlinkError(kind: .io, operation: "opening a netlink socket", errno: 5, message: "\(error)")
        }
    }
}
