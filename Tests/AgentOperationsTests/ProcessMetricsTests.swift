@testable import AgentOperations
import Foundation
import Testing

@Suite struct ProcessMetricsParsingTests {
    /// proc(5): fields are counted after the last `)`, since the command name may hold spaces and parentheses.
    @Test func statFieldsAreCountedAfterTheCommandName() throws {
        let stat = "4242 (hostnet (dnat) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0 12345 104857600 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
        let s = try #require(ProcessMetrics.parseStat(stat, clockTicks: 100, pageSize: 4096, bootTime: 1_700_000_000))
        #expect(s.cpuSeconds == 3.0)               // (250 + 50) / 100
        #expect(s.startTimeSeconds == 1_700_000_123.45)
        #expect(s.virtualBytes == 104_857_600)
        #expect(s.residentBytes == 2048 * 4096)
        #expect(ProcessMetrics.parseStat("garbage", clockTicks: 100, pageSize: 4096, bootTime: 0) == nil)
        #expect(ProcessMetrics.parseStat("1 (x) S 1 2", clockTicks: 100, pageSize: 4096, bootTime: 0) == nil)
    }

    @Test func bootTimeAndFileLimit() {
        #expect(ProcessMetrics.parseBootTime("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n") == 1_700_000_000)
        #expect(ProcessMetrics.parseMaxFDs("Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n") == 1024)
    }

    @Test func rfc3339IsUTCWithMilliseconds() {
        #expect(RFC3339.format(Date(timeIntervalSince1970: 0)) == "1970-01-01T00:00:00.000Z")
        #expect(RFC3339.format(Date(timeIntervalSince1970: 1_796_134_279.9996)) == "2026-12-01T14:11:19.999Z")
        #expect(RFC3339.parse(RFC3339.format(Date(timeIntervalSince1970: 1_796_134_279.25))) == Date(timeIntervalSince1970: 1_796_134_279.25))
    }
}
