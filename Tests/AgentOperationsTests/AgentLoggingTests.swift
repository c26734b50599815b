import AgentOperations
import Foundation
import Logging
import NIOConcurrencyHelpers
import Testing

/// Collects log lines in memory.
final class LineBuffer: Sendable {
    private let box = NIOLockedValueBox([String]())
    var lines: [String] { box.withLockedValue { $0 } }
    var sink: LogSink { LogSink { line in self.box.withLockedValue { $0.append(line) } } }
}

@Suite struct AgentLoggingTests {
    let fixed: @Sendable () -> Date = { Date(timeIntervalSince1970: 1_796_134_279.042) }

    @Test func jsonLinesParseAndCarryTheStatedFields() throws {
        let buffer = LineBuffer()
        let log = AgentLogging.logger(format: .json, sink: buffer.sink, now: fixed)
        log.info("sync done", metadata: ["kind": "partial", "added": .stringConvertible(3), "removed": .stringConvertible(1),
                                         "duration_ms": .stringConvertible(12.5), "service": "shop/web", "ok": .stringConvertible(true)])
        log.warning("skipped", metadata: ["reason": "family-mismatch", "msg": "collides", "nested": ["a": ["1", "2"]]])
        #expect(buffer.lines.count == 2)
        #expect(buffer.lines.allSatisfy { $0.hasSuffix("}\n") && $0.filter { $0 == "\n" }.count == 1 })
        let first = try #require(try JSONSerialization.jsonObject(with: Data(buffer.lines[0].utf8)) as? [String: Any])
        #expect(first["time"] as? String == "2026-12-01T14:11:19.042Z")
        #expect(first["level"] as? String == "info")
        #expect(first["msg"] as? String == "sync done")
        #expect(first["service"] as? String == "shop/web")
        #expect(first["added"] as? Int == 3)
        #expect(first["removed"] as? Int == 1)
        #expect(first["duration_ms"] as? Double == 12.5)
        #expect(first["ok"] as? Bool == true)
        let second = try #require(try JSONSerialization.jsonObject(with: Data(buffer.lines[1].utf8)) as? [String: Any])
        #expect(second["level"] as? String == "warning")
        #expect(second["msg"] as? String == "skipped")
        #expect(second["fields.msg"] as? String == "collides")
        #expect((second["nested"] as? [String: Any])?["a"] as? [String] == ["1", "2"])
    }

    @Test(arguments: ["plain", "quote \" and backslash \\", "new\nline\r\ttab", "nul \u{0} bell \u{7} del \u{7F}",
                      "é 中文 🚀", "line sep \u{2028} para \u{2029}", "</script>", ""])
    func everyStringIsEscapedAndRoundTrips(text: String) throws {
        let buffer = LineBuffer()
        let log = AgentLogging.logger(format: .json, sink: buffer.sink, now: fixed)
        log.error("\(text)", metadata: [text.isEmpty ? "empty" : text: .string(text)])
        let line = try #require(buffer.lines.first)
        #expect(line.filter { $0 == "\n" }.count == 1, "a raw newline inside the JSON line")
        #expect(!line.unicodeScalars.contains { $0.value < 0x20 && $0 != "\n" })
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(object["msg"] as? String == text)
        #expect(object[text.isEmpty ? "empty" : text] as? String == text)
    }

    @Test func textLinesAreTimeLevelMessageThenSortedKeyValues() {
        let buffer = LineBuffer()
        let log = AgentLogging.logger(format: .text, sink: buffer.sink, now: fixed)
        log.info("sync done", metadata: ["removed": .stringConvertible(1), "added": .stringConvertible(3), "service": "shop/web"])
        log.warning("bad object\nsecond line", metadata: ["reason": "has spaces", "field": "a=b", "q": "say \"hi\""])
        #expect(buffer.lines[0] == "2026-12-01T14:11:19.042Z info sync done added=3 removed=1 service=shop/web\n")
        #expect(buffer.lines[1] == "2026-12-01T14:11:19.042Z warning bad object\\nsecond line field=\"a=b\" q=\"say \\\"hi\\\"\" reason=\"has spaces\"\n")
    }

    @Test func theLevelFiltersAndTheFlagsParse() throws {
        let buffer = LineBuffer()
        let log = AgentLogging.logger(format: .text, level: .warning, sink: buffer.sink, now: fixed)
        log.info("hidden")
        log.debug("hidden")
        log.warning("shown")
        #expect(buffer.lines.count == 1)
        #expect(try AgentLogging.level("DEBUG") == .debug)
        #expect(try AgentLogging.level("warn") == .warning)
        #expect(throws: AgentOperationsError.usage("--log-level \"loud\": expected one of trace, debug, info, notice, warning, error, critical")) {
            try AgentLogging.level("loud")
        }
        #expect(AgentLogging.level(verbosity: 0) == .info)
        #expect(AgentLogging.level(verbosity: 2) == .info)
        #expect(AgentLogging.level(verbosity: 4) == .debug)
        #expect(AgentLogging.level(verbosity: 9) == .trace)
        #expect(LogFormat(rawValue: "json") == .json && LogFormat(rawValue: "xml") == nil)
    }

    @Test func concurrentLinesNeverInterleave() async throws {
        let buffer = LineBuffer()
        let log = AgentLogging.logger(format: .json, sink: buffer.sink, now: fixed)
        await withTaskGroup(of: Void.self) { group in
            for t in 0..<8 {
                group.addTask { for i in 0..<200 { log.info("line", metadata: ["t": .stringConvertible(t), "i": .stringConvertible(i)]) } }
            }
        }
        #expect(buffer.lines.count == 1600)
        for line in buffer.lines { _ = try JSONSerialization.jsonObject(with: Data(line.utf8)) }
    }
}

@Suite struct OnceLoggerTests {
    @Test func aRepeatedWarningIsLoggedOnceAndAgainAfterItWentAwayAndCameBack() {
        let buffer = LineBuffer()
        let log = AgentLogging.logger(format: .text, sink: buffer.sink)
        let once = OnceLogger()
        for _ in 0..<5 {
            once.beginPass()
            #expect(buffer.lines.count <= 2)
            once.warning("decode:shop/web:spec.ports[0].port", to: log, "cannot decode Service shop/web")
            once.warning("decode:shop/api:spec.type", to: log, "cannot decode Service shop/api")
            once.endPass()
        }
        #expect(buffer.lines.count == 2)
        // shop/web is fixed: one pass without it, then it breaks again.
        once.beginPass()
        once.warning("decode:shop/api:spec.type", to: log, "cannot decode Service shop/api")
        once.endPass()
        #expect(!once.isSuppressed("decode:shop/web:spec.ports[0].port"))
        once.beginPass()
        #expect(once.warning("decode:shop/web:spec.ports[0].port", to: log, "cannot decode Service shop/web"))
        #expect(!once.warning("decode:shop/api:spec.type", to: log, "cannot decode Service shop/api"))
        once.endPass()
        #expect(buffer.lines.count == 3)
        // Outside passes: forget() brings a key back.
        #expect(!once.warning("decode:shop/api:spec.type", to: log, "again"))
        once.forget("decode:shop/api:spec.type")
        #expect(once.warning("decode:shop/api:spec.type", to: log, "again"))
        #expect(buffer.lines.count == 4)
    }

    @Test func memoryIsBounded() {
        let buffer = LineBuffer()
        let log = AgentLogging.logger(format: .text, level: .critical, sink: buffer.sink)
        let once = OnceLogger(capacity: 100)
        for i in 0..<1000 { once.warning("k\(i)", to: log, "x") }
        #expect((0..<1000).filter { once.isSuppressed("k\($0)") }.count <= 100)
    }
}
