import Foundation
import RulePlanning

/// `NftablesNetlink` over one lasting netlink socket, for a process that changes the ruleset again and again
/// (the `sync` agent): the socket is opened once in the namespace (one setns on a helper thread), so an
/// `update` costs one sendmsg and reading its acks. Calls are serialized; any thread may make them. After an
/// I/O error the socket is dropped and the next call opens a new one. `NftablesNetlink` stays the one-shot
/// form (a socket per call) for the CLI.
public final class NftablesConnection: @unchecked Sendable {
    public let namespace: NetworkNamespace?
    private let lock = NSLock()
    private var session: NetlinkSession?

    /// Opens the socket in `namespace` (nil: the caller's own network namespace).
    public init(namespace: NetworkNamespace? = nil) throws(NetlinkError) {
        self.namespace = namespace
        session = try NetlinkSession.open(in: namespace)
    }

    private var oneShot: NftablesNetlink { NftablesNetlink(namespace: namespace) }

    /// The netlink port id of the socket (nil when it was dropped after an error). Notifications of the
    /// batches it commits carry it; `NftablesChangeMonitor` uses it to tell our changes from others'.
    public var portID: UInt32? {
        lock.lock(); defer { lock.unlock() }
        return session?.socket.portID
    }

    private func withSession<T>(_ body: (inout NetlinkSession) throws(NetlinkError) -> T) throws(NetlinkError) -> T {
        lock.lock(); defer { lock.unlock() }
        var s: NetlinkSession
        if let existing = session { s = existing } else { s = try NetlinkSession.open(in: namespace) }
        do {
            let result = try body(&s)
            session = s
            return result
        } catch {
            session = error.kind == .io ? nil : s
            throw error
        }
    }

    /// `NftablesNetlink.apply(_:)` on this connection.
    @discardableResult
    public func apply(_ plan: RulePlan) throws(NetlinkError) -> ApplyReport {
        let start = Date()
        let ops = try RulesetProgram.operations(plan)
        return try withSession { (s: inout NetlinkSession) throws(NetlinkError) in
            try NftablesNetlink.apply(plan, operations: ops, on: &s, start: start)
        }
    }

    /// `NftablesNetlink.update(from:to:)` on this connection (a full replace across a settings change).
    @discardableResult
    public func update(from old: RulePlan, to new: RulePlan) throws(NetlinkError) -> ApplyReport {
        let start = Date()
        guard let ops = try RulesetProgram.changes(from: old, to: new) else { return try apply(new) }
        if ops.isEmpty { return NftablesNetlink.unchanged(new, start: start) }
        return try withSession { (s: inout NetlinkSession) throws(NetlinkError) in
            try NftablesNetlink.commitChanges(new, operations: ops, on: &s, start: start)
        }
    }

    /// `NftablesNetlink.read(table:)` on this connection.
    public func read(table: String) throws(NetlinkError) -> InstalledRuleset? {
        try withSession { (s: inout NetlinkSession) throws(NetlinkError) in
            try NftablesNetlink.dumpTable(family: .inet, name: table, on: &s).map(RulesetDecoder.decode)
        }
    }

    /// `NftablesNetlink.remove(table:)` on this connection.
    @discardableResult
    public func remove(table: String) throws(NetlinkError) -> Bool {
        try withSession { (s: inout NetlinkSession) throws(NetlinkError) in try NftablesNetlink.remove(table: table, on: &s) }
    }
}
