/// Recorded kernel answers, replayed through the backend's decoders without a socket: the fuzz targets
/// (Tests/Fuzz/netlink.swift, conntrack.swift) and the tests that compare a replay with the live read use
/// it. A recording is a series of datagrams, each a 4-byte little-endian length and then its bytes (a length
/// beyond the end takes what is left). Pure.
enum NetlinkReplay {
    static func datagrams(_ recording: [UInt8]) -> [[UInt8]] {
        var out: [[UInt8]] = []
        var i = 0
        while i + 4 <= recording.count {
            let n = Int(UInt32(recording[i]) | UInt32(recording[i + 1]) << 8 | UInt32(recording[i + 2]) << 16 | UInt32(recording[i + 3]) << 24)
            let end = min(recording.count, i + 4 + n)
            out.append(Array(recording[(i + 4)..<end]))
            i = end
        }
        return out
    }

    static func recording(_ datagrams: [[UInt8]]) -> [UInt8] {
        var out: [UInt8] = []
        for d in datagrams {
            let n = UInt32(d.count)
            out += [UInt8(n & 0xff), UInt8(n >> 8 & 0xff), UInt8(n >> 16 & 0xff), UInt8(n >> 24)]
            out += d
        }
        return out
    }

    /// The datagrams a socket would receive, in order. Each request's sequence number is taken from the first
    /// message that answers it (the recorded requests had random ones).
    struct Feed {
        let datagrams: [[UInt8]]
        private var next = 0

        init(_ datagrams: [[UInt8]]) { self.datagrams = datagrams }

        var sequence: UInt32 {
            next < datagrams.count ? NetlinkParse.messages(in: datagrams[next]).first?.sequence ?? 0 : 0
        }

        /// The next reply, as `NetlinkSession.request` collects it; nil when the datagrams run out first.
        mutating func reply(dump: Bool) throws(NetlinkSession.DumpInterrupted) -> NetlinkSession.Reply? {
            var collector = NetlinkReplyCollector(sequence: sequence, dump: dump)
            while next < datagrams.count {
                let d = datagrams[next]
                next += 1
                if let reply = try collector.consume(d) { return reply }
            }
            return nil
        }
    }

    /// `NftablesNetlink.dumpTable` over recorded replies (one attempt: a changed generation, an interrupted
    /// dump or a recording that ends early is an I/O error).
    static func readTable(_ datagrams: [[UInt8]], family: NftFamily, name: String) throws(NetlinkError) -> DumpedTable? {
        var feed = Feed(datagrams)
        var reader = TableDumpReader(family: family, name: name)
        var step = reader.first
        func ended(_ why: String) -> NetlinkError { NetlinkError(kind: .io, operation: "replaying table \(family) \(name)", errno: 5, message: why) }
        while true {
            switch step {
            case .send(let request):
                let reply: NetlinkSession.Reply?
                do { reply = try feed.reply(dump: request.dump) } catch { throw ended("the dump was interrupted") }
                guard let reply else { throw ended("the recording ended") }
                step = try reader.next(reply)
            case .done(let table):
                return table
            case .changed:
                throw ended("the generation changed")
            }
        }
    }

    /// `NetlinkBatch.commit`'s reading of the answers to `batch`, encoded from `beginSequence`.
    static func commit(_ batch: NetlinkBatch, beginSequence: UInt32, _ datagrams: [[UInt8]]) throws(NetlinkError) -> NetlinkBatch.Result {
        let enc = batch.encode(beginSequence: beginSequence)
        var answers = BatchAnswers(enc)
        for d in datagrams where !answers.isComplete { answers.consume(d) }
        return try batch.result(answers, enc)
    }

    /// `ConntrackSession.dump`'s reading of one dump: how it ended and how many entries it scanned.
    static func conntrackDump(_ datagrams: [[UInt8]], _ visit: (ConntrackEntry) -> Void) -> (ConntrackDumpReader.Progress, scanned: Int) {
        var reader = ConntrackDumpReader(sequence: Feed(datagrams).sequence)
        for d in datagrams {
            let p = reader.consume(d, visit)
            if p != .more { return (p, reader.scanned) }
        }
        return (.more, reader.scanned)
    }
}
