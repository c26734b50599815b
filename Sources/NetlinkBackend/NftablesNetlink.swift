import Foundation
import NetAddress
import RulePlanning

/// What one `apply` sent.
public struct ApplyReport: Sendable, Equatable {
    public var table: String
    public var mappings: Int
    /// The shared `pick<f>-<proto>-<N>` chains.
    public var pickChains: Int
    /// Elements over all maps and sets (dispatch, endpoints, masquerade).
    public var elements: Int
    /// Netlink messages in the batch, including BATCH_BEGIN and BATCH_END.
    public var messages: Int
    public var bytes: Int
    public var seconds: Double
    /// True when `update` changed elements and pick chains in place; false for a full replace of the table
    /// (`apply`, or `update` across a settings change).
    public var incremental: Bool = false
    /// Elements the batch added and deleted (a changed element counts once in each). For a full replace,
    /// `elementsAdded` is every element of the plan and `elementsDeleted` is 0: the old table's elements go
    /// with the table and are not counted.
    public var elementsAdded: Int = 0
    public var elementsDeleted: Int = 0
    /// Chains the batch added and deleted (a pick chain's one rule is added and deleted with it). For a
    /// full replace, every chain of the plan.
    public var chainsAdded: Int = 0
    public var chainsDeleted: Int = 0
    /// Sets and maps the batch added and deleted: affinity sets (one per destination of a ClientIP service)
    /// and the ranged maps. For a full replace, every set of the plan.
    public var setsAdded: Int = 0
    public var setsDeleted: Int = 0
    /// Affinity chains whose rules the batch deleted and wrote anew (their destinations changed).
    public var chainsRewritten: Int = 0

    /// Kernel objects the batch changed: elements, chains and sets added and deleted, and rewritten chains.
    /// 0 when nothing was sent.
    public var objectsChanged: Int {
        elementsAdded + elementsDeleted + chainsAdded + chainsDeleted + setsAdded + setsDeleted + chainsRewritten
    }
}

/// The nftables backend over netlink (libnftnl + libmnl framing, no `nft` binary): installs a `RulePlan` as
/// one atomic batch, reads a table back, removes it, and answers small questions about other tables.
/// Everything happens in `namespace` (nil: the caller's own network namespace).
public struct NftablesNetlink: Sendable {
    public let namespace: NetworkNamespace?

    public init(namespace: NetworkNamespace? = nil) { self.namespace = namespace }

    // MARK: apply / remove

    /// The comment our table carries (`comment "managed by hostnet-dnat"`, table userdata): the mark that
    /// the table is ours to replace and delete.
    public static let ownershipComment = RulesetProgram.ownershipComment

    /// Replaces `table inet <plan.settings.table>` with the plan in ONE batch: create table (so the delete
    /// cannot fail), delete table, then the whole table as docs/ruleset.md describes it. The kernel commits
    /// all of it or nothing: on error the previous ruleset is untouched and the error names the operation.
    /// An existing table of that name without our comment is another tool's (or an unmarked one from an
    /// older hostnet-dnat): `.foreignTable`, and nothing is sent.
    @discardableResult
    public func apply(_ plan: RulePlan) throws(NetlinkError) -> ApplyReport {
        let start = Date()
        let ops = try RulesetProgram.operations(plan)
        var session = try NetlinkSession.open(in: namespace)
        return try Self.apply(plan, operations: ops, on: &session, start: start)
    }

    static func apply(_ plan: RulePlan, operations ops: [NftOperation], on session: inout NetlinkSession,
                      start: Date) throws(NetlinkError) -> ApplyReport {
        let batch = NetlinkBatch(ops)
        let table = plan.settings.table
        // The ownership check and the batch are not one transaction: a table created (or replaced) by
        // someone else between the GETTABLE and the commit is not seen. nf_tables has no conditional delete,
        // so this is accepted; the check runs on the same socket once the batch is encoded, right before it
        // is sent, to keep that window as small as possible.
        let result = try batch.commit(on: session.socket) { () throws(NetlinkError) in
            _ = try Self.refuseForeignTable(&session, name: table, verb: "replace")
        }
        let c = RulesetProgram.counts(ops)
        return ApplyReport(table: plan.settings.table, mappings: plan.rules.count, pickChains: plan.nftPickChains.count,
                           elements: c.elementsAdded, messages: result.messages, bytes: result.bytes,
                           seconds: Date().timeIntervalSince(start), incremental: false,
                           elementsAdded: c.elementsAdded, elementsDeleted: 0, chainsAdded: c.chainsAdded, chainsDeleted: 0,
                           setsAdded: c.setsAdded)
    }

    /// Turns the table that `old` installed (a plan this process applied or updated to before) into `new`
    /// in ONE batch that touches only what differs: the dispatch, ranged, endpoint-slot and masquerade
    /// elements whose key, data or comment changed (a changed element is deleted and added again), the pick
    /// chains that appear or are no longer used, and the affinity chains and sets of ClientIP services whose
    /// destinations changed (the set of a destination that stays keeps its clients); never the table, the
    /// base chains or the dispatch, endpoints and masquerade maps. Equal plans send nothing
    /// (`objectsChanged == 0`). A different table name, priority or masquerade setting, the last source
    /// range gone, or a changed affinity timeout is not incremental: `update` then replaces the whole table
    /// like `apply(new)` (`incremental == false`; see `RulesetProgram.changes`).
    ///
    /// The batch assumes the kernel holds exactly what `old` installed: its deletes name existing keys and
    /// its adds are exclusive. When the table was changed behind our back (an element deleted or added by
    /// hand, the table gone) the kernel refuses the whole batch and nothing is committed: a `.rejected`
    /// error, `isOutOfSync` for the usual ENOENT / EEXIST / EBUSY. The caller then applies `new` in full.
    /// Unlike `apply`, it does not look up the table's ownership first (one sendmsg per update): it only
    /// changes elements of the maps `old` created and the chains and sets `old` and `new` name, and fails
    /// when they are not there.
    @discardableResult
    public func update(from old: RulePlan, to new: RulePlan) throws(NetlinkError) -> ApplyReport {
        let start = Date()
        guard let ops = try RulesetProgram.changes(from: old, to: new) else { return try apply(new) }
        if ops.isEmpty { return Self.unchanged(new, start: start) }
        var session = try NetlinkSession.open(in: namespace)
        return try Self.commitChanges(new, operations: ops, on: &session, start: start)
    }

    static func unchanged(_ plan: RulePlan, start: Date) -> ApplyReport {
        ApplyReport(table: plan.settings.table, mappings: plan.rules.count, pickChains: RulesetProgram.pickChains(plan).count,
                    elements: elementCount(plan), messages: 0, bytes: 0, seconds: Date().timeIntervalSince(start), incremental: true)
    }

    static func commitChanges(_ new: RulePlan, operations ops: [NftOperation], on session: inout NetlinkSession,
                              start: Date) throws(NetlinkError) -> ApplyReport {
        let result = try NetlinkBatch(ops).commit(on: session.socket)
        let c = RulesetProgram.counts(ops)
        return ApplyReport(table: new.settings.table, mappings: new.rules.count, pickChains: RulesetProgram.pickChains(new).count,
                           elements: elementCount(new), messages: result.messages, bytes: result.bytes,
                           seconds: Date().timeIntervalSince(start), incremental: true, elementsAdded: c.elementsAdded,
                           elementsDeleted: c.elementsDeleted, chainsAdded: c.chainsAdded, chainsDeleted: c.chainsDeleted,
                           setsAdded: c.setsAdded, setsDeleted: c.setsDeleted, chainsRewritten: c.chainsRewritten)
    }

    /// Elements of the installed plan: dispatch entries, endpoint slots, masquerade addresses.
    static func elementCount(_ plan: RulePlan) -> Int {
        let rules = plan.rules
        var slots = 0
        for i in rules.indices { slots += rules[i].mapping.target.destinationCount }
        let masq = plan.settings.masquerade
            ? RulesetProgram.externalAddresses(plan, .ipv4).count + RulesetProgram.externalAddresses(plan, .ipv6).count : 0
        return plan.rules.count + slots + masq
    }

    /// The operations `update(from:to:)` would send, one description per netlink message; nil when it
    /// would replace the whole table (see `describe(_:)`).
    public static func describeUpdate(from old: RulePlan, to new: RulePlan) throws(NetlinkError) -> [String]? {
        try RulesetProgram.changes(from: old, to: new)?.map(\.description)
    }

    /// The operations `apply` would send, one description per netlink message (for --dry-run / debugging).
    public static func describe(_ plan: RulePlan) throws(NetlinkError) -> [String] {
        try RulesetProgram.operations(plan).map(\.description)
    }

    /// Deletes `table inet <table>`. False when there was no such table. A table of that name without our
    /// comment is never deleted: `.foreignTable`, and nothing is sent.
    @discardableResult
    public func remove(table: String) throws(NetlinkError) -> Bool {
        var session = try NetlinkSession.open(in: namespace)
        return try Self.remove(table: table, on: &session)
    }

    static func remove(table: String, on session: inout NetlinkSession) throws(NetlinkError) -> Bool {
        let t = NftTable(family: .inet, name: table)
        let batch = NetlinkBatch([NftOperation(kind: .deleteTable(t), description: "deleting table inet \(table)")])
        do {
            // (Not one transaction with the delete either; see apply.)
            _ = try batch.commit(on: session.socket) { () throws(NetlinkError) in
                // Nothing to delete: sending nothing is the same as the kernel's ENOENT below.
                if try !Self.refuseForeignTable(&session, name: table, verb: "delete") { throw NetlinkError(kind: .rejected, operation: "deleting table inet \(table)", errno: 2, message: "no such table") }
            }
            return true
        } catch where error.errno == 2 /* ENOENT */ && error.kind == .rejected {
            return false
        }
    }

    /// Throws `.foreignTable` when `table inet <table>` exists without our comment (apply and remove would
    /// refuse it). Returns whether the table exists. For callers that want to refuse before doing anything
    /// else (e.g. a dry run).
    @discardableResult
    public func requireOwnership(table: String) throws(NetlinkError) -> Bool {
        var session = try NetlinkSession.open(in: namespace)
        return try Self.refuseForeignTable(&session, name: table, verb: "replace")
    }

    /// One GETTABLE for `inet <name>`: false when it does not exist, true when it is ours, `.foreignTable`
    /// otherwise.
    static func refuseForeignTable(_ s: inout NetlinkSession, name: String, verb: String) throws(NetlinkError) -> Bool {
        let what = "looking up table inet \(name)"
        let reply: NetlinkSession.Reply
        do { reply = try s.request(NftMessageType.getTable, family: .inet, dump: false, table: name) } catch let e as NetlinkError {
            throw e
        } catch {
            throw NetlinkError(kind: .io, operation: what, errno: 5, message: "\(error)")
        }
        return try ownership(reply, name: name, verb: verb)
    }

    /// The answer to `refuseForeignTable`'s GETTABLE: false when the table does not exist, true when it is
    /// ours, `.foreignTable` otherwise. Pure.
    static func ownership(_ reply: NetlinkSession.Reply, name: String, verb: String) throws(NetlinkError) -> Bool {
        let what = "looking up table inet \(name)"
        switch reply {
        case .error(2): return false
        case .error(let e):
            throw NetlinkError(kind: NetlinkError.kind(errno: e, operation: nil), operation: what, errno: e, message: NetlinkSocket.describe(e))
        case .messages(let m):
            guard let (b, h) = m.first, let t = NftDecoder.table(b, h) else {
                throw NetlinkError(kind: .io, operation: what, errno: 5, message: "the kernel's answer could not be decoded")
            }
            if t.comment == ownershipComment { return true }
            throw NetlinkError(
                kind: .foreignTable, operation: what, errno: 0,
                message: "table inet \(name) exists and was not created by hostnet-dnat (no \"\(ownershipComment)\" comment"
                    + (t.comment.map { "; its comment is \"\($0)\"" } ?? "") + "); refusing to \(verb) it: choose another --table. "
                    + "(A table left by a hostnet-dnat version older than this mark has no comment either; if it is yours, "
                    + "delete it once with `nft delete table inet \(name)`.)")
        }
    }

    // MARK: read back

    /// The plan's ruleset as `read(table:)` would decode it once applied.
    public static func expected(_ plan: RulePlan) -> InstalledRuleset { RulesetDecoder.expected(plan) }

    /// Reads `table inet <table>` over netlink and decodes it; nil when the table does not exist. The dumps
    /// are repeated if the ruleset changes while they run, so the result is one consistent generation.
    public func read(table: String) throws(NetlinkError) -> InstalledRuleset? {
        try dumpTable(family: .inet, name: table).map(RulesetDecoder.decode)
    }

    func dumpTable(family: NftFamily, name: String) throws(NetlinkError) -> DumpedTable? {
        var session = try NetlinkSession.open(in: namespace)
        return try Self.dumpTable(family: family, name: name, on: &session)
    }

    static func dumpTable(family: NftFamily, name: String, on session: inout NetlinkSession) throws(NetlinkError) -> DumpedTable? {
        var lastError: NetlinkError?
        for _ in 0..<8 {
            do {
                var reader = TableDumpReader(family: family, name: name)
                var step = reader.first
                retry: while true {
                    switch step {
                    case .send(let r):
                        step = try reader.next(session.request(r.type, family: r.family, dump: r.dump, table: r.table, set: r.set))
                    case .done(let dumped):
                        return dumped
                    case .changed:
                        break retry
                    }
                }
            } catch is NetlinkSession.DumpInterrupted {
                continue
            } catch let e as NetlinkError {
                lastError = e
                if e.kind != .io { throw e }
            } catch {
                throw NetlinkError(kind: .io, operation: "reading table \(family) \(name)", errno: 5, message: "\(error)")
            }
        }
        throw lastError ?? NetlinkError(kind: .io, operation: "reading table \(family) \(name)", errno: 11,
                                        message: "the ruleset kept changing while it was read")
    }

    // MARK: proxy detection helpers

    /// Whether `table <family> <name>` exists (e.g. `ip kube-proxy`, `inet kube-proxy`).
    public func tableExists(family: NftFamily, name: String) throws(NetlinkError) -> Bool {
        try exists(NftMessageType.getTable, family: family, table: name, chain: nil, what: "looking up table \(family) \(name)")
    }

    /// Whether chain `<chain>` exists in `table <family> <table>` (e.g. `ip nat KUBE-SERVICES` made by iptables-nft).
    public func chainExists(family: NftFamily, table: String, chain: String) throws(NetlinkError) -> Bool {
        try exists(NftMessageType.getChain, family: family, table: table, chain: chain,
                   what: "looking up chain \(family) \(table) \(chain)")
    }

    private func exists(_ type: UInt16, family: NftFamily, table: String, chain: String?, what: String) throws(NetlinkError) -> Bool {
        var s = try NetlinkSession.open(in: namespace)
        do {
            switch try s.request(type, family: family, dump: false, table: table, chain: chain) {
            case .messages(let m): return !m.isEmpty
            case .error(2): return false
            case .error(let e):
                throw NetlinkError(kind: NetlinkError.kind(errno: e, operation: nil), operation: what, errno: e, message: NetlinkSocket.describe(e))
            }
        } catch let e as NetlinkError {
            throw e
        } catch {
            throw NetlinkError(kind: .io, operation: what, errno: 5, message: "\(error)")
        }
    }
}

/// Reads `table <family> <name>` as the series of requests that dump it: the ruleset generation, the table,
/// its chains, its sets, each set's elements, its rules, and the generation again (a different one: the
/// ruleset changed meanwhile, `.changed`, read it again). Pure: `NftablesNetlink.dumpTable` sends the
/// requests it asks for and feeds it the kernel's replies; the fuzz target (Tests/Fuzz/netlink.swift) feeds
/// it arbitrary ones. A reply that cannot be decoded throws; objects of other tables are dropped.
struct TableDumpReader {
    struct Request: Equatable {
        var type: UInt16
        var family: NftFamily?
        var dump: Bool
        var table: String?
        var set: String?
    }

    enum Step {
        case send(Request)
        /// The table as dumped; nil when it does not exist.
        case done(DumpedTable?)
        case changed
    }

    let family: NftFamily
    let name: String
    private enum Stage { case generation, table, chains, sets, elements(Int), rules, generationAgain, finished }
    private var stage = Stage.generation
    private var generation: UInt32 = 0
    private var table: NftTable?
    private var chains: [NftChain] = []
    private var sets: [NftSet] = []
    private var elements: [String: [NftElement]] = [:]
    private var rules: [NftRule] = []

    init(family: NftFamily, name: String) { self.family = family; self.name = name }

    /// The first request.
    var first: Step { .send(Request(type: NftMessageType.getGen, family: nil, dump: false, table: nil, set: nil)) }

    private func request(_ type: UInt16, dump: Bool = true, set: String? = nil) -> Step {
        .send(Request(type: type, family: family, dump: dump, table: name, set: set))
    }

    private func failure(_ what: String, _ e: Int32) -> NetlinkError {
        NetlinkError(kind: NetlinkError.kind(errno: e, operation: nil), operation: what, errno: e, message: NetlinkSocket.describe(e))
    }

    private func dumped<T>(_ reply: NetlinkSession.Reply, _ what: String, _ decode: ([UInt8], NetlinkHeader) -> T?) throws(NetlinkError) -> [T] {
        switch reply {
        case .error(2): return []  // the table vanished meanwhile; the generation check reads it again
        case .error(let e): throw failure(what, e)
        case .messages(let m): return m.compactMap { decode($0.0, $0.1) }
        }
    }

    private mutating func elements(from i: Int) -> Step {
        guard i < sets.count else { stage = .rules; return request(NftMessageType.getRule) }
        stage = .elements(i)
        return request(NftMessageType.getSetElem, set: sets[i].name)
    }

    /// The reply to the last request → the next request, or the result.
    mutating func next(_ reply: NetlinkSession.Reply) throws(NetlinkError) -> Step {
        let t = "\(family) \(name)"
        switch stage {
        case .generation:
            generation = try NetlinkSession.generation(reply)
            stage = .table
            return request(NftMessageType.getTable, dump: false)
        case .table:
            switch reply {
            case .error(2):
                stage = .finished
                return .done(nil)
            case .error(let e):
                throw failure("reading table \(t)", e)
            case .messages(let m):
                guard let (b, h) = m.first, let decoded = NftDecoder.table(b, h) else { throw failure("reading table \(t)", 5) }
                table = decoded
            }
            stage = .chains
            return request(NftMessageType.getChain)
        case .chains:
            chains = try dumped(reply, "listing chains of \(t)", NftDecoder.chain).filter { $0.table == name && $0.family == family }
            stage = .sets
            return request(NftMessageType.getSet)
        case .sets:
            sets = try dumped(reply, "listing sets of \(t)", NftDecoder.set).filter { $0.table == name && $0.family == family }
            return elements(from: 0)
        case .elements(let i):
            let set = sets[i].name
            elements[set] = try dumped(reply, "listing elements of \(t) \(set)", NftDecoder.elements).flatMap { $0.1 }
            return elements(from: i + 1)
        case .rules:
            rules = try dumped(reply, "listing rules of \(t)", NftDecoder.rule).filter { $0.table == name && $0.family == family }
            stage = .generationAgain
            return first
        case .generationAgain:
            stage = .finished
            guard try NetlinkSession.generation(reply) == generation, let table else { return .changed }
            return .done(DumpedTable(table: table, chains: chains, sets: sets, elements: elements, rules: rules))
        case .finished:
            throw NetlinkError(kind: .io, operation: "reading table \(t)", errno: 5, message: "a reply after the dump ended")
        }
    }
}
