import Foundation
import KubeObjects
import Logging
import NIOConcurrencyHelpers

/// `--log-format`: `text` for people (`time level msg key=value…`), `json` for log pipelines (one object a line).
public enum LogFormat: String, Sendable, CaseIterable {
    case text
    case json
}

/// Where log lines go: standard error in the agent, a buffer in tests. Each line is written whole, under a
/// lock, so lines from different threads never interleave.
public final class LogSink: Sendable {
    private let write: @Sendable (String) -> Void
    private let lock = NIOLock()

    /// `write` receives one complete line, newline included.
    public init(_ write: @escaping @Sendable (String) -> Void) {
        self.write = write
    }

    public func emit(_ line: String) {
        lock.withLock { write(line) }
    }

    /// Standard error, unbuffered. A failed write (stderr closed, a broken pipe) drops the line: logging
    /// must never take the agent down.
    public static let standardError = LogSink { line in
        try? FileHandle.standardError.write(contentsOf: Data(line.utf8))
    }
}

/// swift-log handlers and the level flags of `hostnet-dnat sync`.
public enum AgentLogging {
    /// Installs the agent's handler process-wide (`LoggingSystem.bootstrap`, which may run once per process).
    public static func bootstrap(format: LogFormat, level: Logger.Level, sink: LogSink = .standardError) {
        LoggingSystem.bootstrap { label in
            AgentLogHandler(label: label, format: format, level: level, sink: sink)
        }
    }

    /// A logger writing to `sink`, without touching the process-wide bootstrap (tests, or one-off loggers).
    public static func logger(label: String = "hostnet-dnat", format: LogFormat, level: Logger.Level = .info,
                              sink: LogSink, now: @escaping @Sendable () -> Date = { Date() }) -> Logger {
        Logger(label: label) { label in AgentLogHandler(label: label, format: format, level: level, sink: sink, now: now) }
    }

    /// Parses `--log-level`: swift-log's names (`trace`, `debug`, `info`, `notice`, `warning`, `error`,
    /// `critical`), plus `warn`. A bad value is a usage error.
    public static func level(_ text: String) throws(AgentOperationsError) -> Logger.Level {
        let t = text.lowercased()
        if t == "warn" { return .warning }
        guard let level = Logger.Level(rawValue: t) else {
            throw .usage("--log-level \(text.debugDescription): expected one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return level
    }

    /// `--v N`, klog's verbosity, as kube-proxy users know it: up to 2 (kube-proxy's default) is `info`,
    /// 3 and 4 are `debug`, 5 and more `trace`.
    public static func level(verbosity: Int) -> Logger.Level {
        switch verbosity {
        case ..<3: .info
        case 3...4: .debug
        default: .trace
        }
    }
}

/// The agent's swift-log handler.
///
/// text: `2026-12-01T14:11:19.123Z info sync done added=3 removed=1 service=shop/web` — metadata sorted by key,
/// values quoted (Swift string escaping) when they hold spaces, quotes, `=` or control characters.
///
/// json: `{"time":"2026-12-01T14:11:19.123Z","level":"info","msg":"sync done","added":3,"removed":1,…}` —
/// metadata flattened into the object; integers, floating-point numbers and booleans stay JSON numbers and
/// booleans (so `duration_ms` can be summed), everything else is a string, nested dictionaries and arrays
/// become objects and arrays. A metadata key that would overwrite `time`, `level` or `msg` is written as
/// `fields.<key>`. Every string goes through `JSONText.quote`.
public struct AgentLogHandler: LogHandler {
    public let label: String
    public let format: LogFormat
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    private let sink: LogSink
    private let now: @Sendable () -> Date

    public init(label: String, format: LogFormat, level: Logger.Level, sink: LogSink,
                now: @escaping @Sendable () -> Date = { Date() }) {
        self.label = label
        self.format = format
        self.logLevel = level
        self.sink = sink
        self.now = now
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { _, new in new } }
        if let explicit = event.metadata { merged.merge(explicit) { _, new in new } }
        let time = RFC3339.format(now())
        let message = event.message.description
        switch format {
        case .text: sink.emit(Self.textLine(time: time, level: event.level, message: message, metadata: merged))
        case .json: sink.emit(Self.jsonLine(time: time, level: event.level, message: message, metadata: merged))
        }
    }

    public func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String,
                    file: String, function: String, line: UInt) {
        log(event: LogEvent(level: level, message: message, metadata: metadata, source: source, file: file, function: function, line: line))
    }

    static func textLine(time: String, level: Logger.Level, message: String, metadata: Logger.Metadata) -> String {
        var line = "\(time) \(level.rawValue) \(Self.textValue(message, always: false, isMessage: true))"
        for key in metadata.keys.sorted() {
            line += " \(Self.textValue(key, always: false))=\(Self.textValue(Self.plain(metadata[key]!), always: false))"
        }
        return line + "\n"
    }

    /// The value as is when it is one harmless word, else quoted with escapes. A message may hold spaces but
    /// never a raw newline or control character (one event, one line).
    static func textValue(_ s: String, always: Bool, isMessage: Bool = false) -> String {
        let needsQuotes = always || s.isEmpty || s.unicodeScalars.contains { c in
            c.value < 0x20 || c.value == 0x7F || (!isMessage && (c == " " || c == "\"" || c == "=")) || (c.value >= 0x80 && c.properties.generalCategory == .control)
        }
        if !needsQuotes { return s }
        if isMessage {
            // Keep the message readable: escape only what would break the line.
            let q = JSONText.quote(s)
            return String(q.dropFirst().dropLast())
        }
        return JSONText.quote(s)
    }

    static func plain(_ value: Logger.Metadata.Value) -> String {
        switch value {
        case .string(let s): s
        case .stringConvertible(let c): c.description
        case .array(let a): "[" + a.map(plain).joined(separator: ",") + "]"
        case .dictionary(let d): "{" + d.keys.sorted().map { "\($0):\(plain(d[$0]!))" }.joined(separator: ",") + "}"
        }
    }

    static func jsonLine(time: String, level: Logger.Level, message: String, metadata: Logger.Metadata) -> String {
        var out = "{\"time\":\(JSONText.quote(time)),\"level\":\(JSONText.quote(level.rawValue)),\"msg\":\(JSONText.quote(message))"
        for key in metadata.keys.sorted() {
            let name = ["time", "level", "msg"].contains(key) ? "fields.\(key)" : key
            out += ",\(JSONText.quote(name)):\(json(metadata[key]!))"
        }
        return out + "}\n"
    }

    static func json(_ value: Logger.Metadata.Value) -> String {
        switch value {
        case .string(let s):
            return JSONText.quote(s)
        case .stringConvertible(let c):
            switch c {
            case let b as Bool: return b ? "true" : "false"
            case let i as any BinaryInteger: return String(describing: i)
            case let d as Double where d.isFinite: return String(describing: d)
            case let f as Float where f.isFinite: return String(describing: f)
            default: return JSONText.quote(c.description)
            }
        case .array(let a):
            return "[" + a.map(json).joined(separator: ",") + "]"
        case .dictionary(let d):
            return "{" + d.keys.sorted().map { "\(JSONText.quote($0)):\(json(d[$0]!))" }.joined(separator: ",") + "}"
        }
    }
}

/// JSON string literals: KubeObjects' one escaper (`JSONValue.quoted`), under the name the log handlers use.
public enum JSONText {
    public static func quote(_ s: String) -> String { JSONValue.quoted(s) }
}

/// Logs a warning once per key, not at every sync: the same bad object (`namespace/name` + what is wrong)
/// would otherwise fill the log every few seconds. A key is logged again only after `forget` (the object was
/// fixed or deleted) or after a pass that did not report it (`endPass`).
///
/// Two ways to use it: call `forget(key)` when the loop knows an object went away; or bracket each full
/// resolution with `beginPass()` … `endPass()`, and every key not reported in between is forgotten. Bounded:
/// at most `capacity` keys are remembered; beyond that the oldest pass's keys are dropped first (worst case
/// a line is repeated, never lost).
public final class OnceLogger: Sendable {
    public let capacity: Int
    private struct State {
        var active: [String: UInt64] = [:]   // key -> pass in which it was last reported
        var pass: UInt64 = 0
        var passOpen = false
        var seenThisPass: Set<String> = []
    }
    private let state = NIOLockedValueBox(State())

    public init(capacity: Int = 10_000) {
        self.capacity = capacity
    }

    /// Logs `message` at `level` unless `key` was already logged (and not forgotten since). Returns whether
    /// it logged.
    @discardableResult
    public func log(_ key: String, level: Logger.Level = .warning, to logger: Logger,
                    _ message: @autoclosure () -> Logger.Message, metadata: @autoclosure () -> Logger.Metadata? = nil,
                    source: String? = nil, file: String = #fileID, function: String = #function, line: UInt = #line) -> Bool {
        let first = state.withLockedValue { s -> Bool in
            if s.passOpen { s.seenThisPass.insert(key) }
            let isNew = s.active[key] == nil
            s.active[key] = s.pass
            if s.active.count > capacity, let oldest = s.active.min(by: { $0.value < $1.value })?.value {
                s.active = s.active.filter { $0.value != oldest || $0.key == key }
            }
            return isNew
        }
        if first {
            logger.log(level: level, message(), metadata: metadata(), source: source, file: file, function: function, line: line)
        }
        return first
    }

    /// `log(key, level: .warning, …)`.
    @discardableResult
    public func warning(_ key: String, to logger: Logger, _ message: @autoclosure () -> Logger.Message,
                        metadata: @autoclosure () -> Logger.Metadata? = nil,
                        file: String = #fileID, function: String = #function, line: UInt = #line) -> Bool {
        log(key, level: .warning, to: logger, message(), metadata: metadata(), file: file, function: function, line: line)
    }

    /// The problem behind `key` is gone: log it again if it comes back.
    public func forget(_ key: String) {
        _ = state.withLockedValue { $0.active.removeValue(forKey: key) }
    }

    /// Starts a pass that reports every current problem (a full resolution).
    public func beginPass() {
        state.withLockedValue { s in
            s.pass += 1
            s.passOpen = true
            s.seenThisPass = []
        }
    }

    /// Ends the pass: keys not reported since `beginPass()` are forgotten.
    public func endPass() {
        state.withLockedValue { s in
            guard s.passOpen else { return }
            s.active = s.active.filter { s.seenThisPass.contains($0.key) }
            s.passOpen = false
            s.seenThisPass = []
        }
    }

    /// Whether `key` is currently suppressed.
    public func isSuppressed(_ key: String) -> Bool {
        state.withLockedValue { $0.active[key] != nil }
    }
}
