import AgentOperations
import Foundation
import Prometheus
import Testing

@Suite struct AgentMetricsTests {
    @Test func everyMetricOfTheIssueIsExportedWithItsTypeAndLabels() throws {
        let m = AgentMetrics()
        let at = Date(timeIntervalSince1970: 1_700_000_000.5)
        m.syncFinished(kind: .full, duration: .milliseconds(120), mappingsByFamily: ["ipv4": 12, "ipv6": 3],
                       skippedByReason: ["headless": 2, "no-external-ip": 5], at: at)
        m.syncFinished(kind: .partial, duration: .milliseconds(3), mappingsByFamily: ["ipv4": 13, "ipv6": 3],
                       skippedByReason: ["headless": 2, "no-external-ip": 5], at: at.addingTimeInterval(1))
        m.syncFailed(reason: "kernel")
        m.syncFailed(reason: "kernel")
        m.watchRestarted(resource: "services", reason: "gone")
        m.conntrackEntriesDeleted(4)
        m.conntrackEntriesDeleted(0)
        m.networkProgrammed(latency: .milliseconds(40))
        let p = try PrometheusText(m.exposition())

        #expect(p.types["hostnet_dnat_sync_duration_seconds"] == "histogram")
        #expect(p.types["hostnet_dnat_network_programming_duration_seconds"] == "histogram")
        #expect(p.types["hostnet_dnat_mappings"] == "gauge")
        #expect(p.types["hostnet_dnat_skipped"] == "gauge")
        #expect(p.types["hostnet_dnat_sync_errors_total"] == "counter")
        #expect(p.types["hostnet_dnat_watch_restarts_total"] == "counter")
        #expect(p.types["hostnet_dnat_conntrack_entries_deleted_total"] == "counter")
        #expect(p.types["hostnet_dnat_last_successful_sync_timestamp_seconds"] == "gauge")

        #expect(p.value("hostnet_dnat_sync_duration_seconds_count", ["kind": "full"]) == 1)
        #expect(p.value("hostnet_dnat_sync_duration_seconds_count", ["kind": "partial"]) == 1)
        #expect(abs((p.value("hostnet_dnat_sync_duration_seconds_sum", ["kind": "full"]) ?? 0) - 0.12) < 1e-9)
        // 3 ms falls in the 4 ms bucket, not the 2 ms one (kube-proxy's exponential buckets).
        #expect(p.value("hostnet_dnat_sync_duration_seconds_bucket", ["kind": "partial", "le": "0.002"]) == 0)
        #expect(p.value("hostnet_dnat_sync_duration_seconds_bucket", ["kind": "partial", "le": "0.004"]) == 1)
        #expect(p.value("hostnet_dnat_mappings", ["family": "ipv4"]) == 13)
        #expect(p.value("hostnet_dnat_mappings", ["family": "ipv6"]) == 3)
        #expect(p.value("hostnet_dnat_skipped", ["reason": "no-external-ip"]) == 5)
        #expect(p.value("hostnet_dnat_sync_errors_total", ["reason": "kernel"]) == 2)
        #expect(p.value("hostnet_dnat_watch_restarts_total", ["resource": "services", "reason": "gone"]) == 1)
        #expect(p.value("hostnet_dnat_conntrack_entries_deleted_total") == 4)
        #expect(p.value("hostnet_dnat_last_successful_sync_timestamp_seconds") == 1_700_000_001.5)
        #expect(p.value("hostnet_dnat_network_programming_duration_seconds_count") == 1)
        #expect(p.value("hostnet_dnat_network_programming_duration_seconds_bucket", ["le": "0.025"]) == 0)
        #expect(p.value("hostnet_dnat_network_programming_duration_seconds_bucket", ["le": "0.05"]) == 1)
        try checkHistograms(p)
    }

    @Test func aSkipReasonThatVanishesGoesToZeroAndAFamilyLeftOutIsZero() throws {
        let m = AgentMetrics(processMetrics: false)
        m.syncFinished(kind: .full, duration: .milliseconds(1), mappingsByFamily: ["ipv4": 2, "ipv6": 1],
                       skippedByReason: ["headless": 1, "family-mismatch": 2], at: Date())
        m.syncFinished(kind: .partial, duration: .milliseconds(1), mappingsByFamily: ["ipv4": 2],
                       skippedByReason: ["headless": 1], at: Date())
        let p = try PrometheusText(m.exposition())
        #expect(p.value("hostnet_dnat_skipped", ["reason": "family-mismatch"]) == 0)
        #expect(p.value("hostnet_dnat_skipped", ["reason": "headless"]) == 1)
        #expect(p.value("hostnet_dnat_mappings", ["family": "ipv6"]) == 0)
    }

    @Test func beforeAnySyncTheFamiliesAndKindsAreThereAtZero() throws {
        let p = try PrometheusText(AgentMetrics(processMetrics: false).exposition())
        #expect(p.value("hostnet_dnat_mappings", ["family": "ipv4"]) == 0)
        #expect(p.value("hostnet_dnat_sync_duration_seconds_count", ["kind": "full"]) == 0)
        #expect(p.value("hostnet_dnat_sync_duration_seconds_count", ["kind": "partial"]) == 0)
        #expect(p.series("process_resident_memory_bytes").isEmpty)
    }

    @Test func labelValuesAreBoundedAndOddValuesStayValidText() throws {
        let m = AgentMetrics(processMetrics: false)
        for i in 0..<(AgentMetrics.maxLabelValues + 20) { m.syncFailed(reason: "r\(i)") }
        m.syncFailed(reason: "quote\" back\\slash\nnewline")
        let p = try PrometheusText(m.exposition())
        let series = p.series("hostnet_dnat_sync_errors_total")
        #expect(series.count == AgentMetrics.maxLabelValues + 1)  // 64 reasons + "other"
        #expect(p.value("hostnet_dnat_sync_errors_total", ["reason": "other"]) == 21)
    }

    @Test func negativeProgrammingLatencyFromClockSkewCountsAsZero() throws {
        let m = AgentMetrics(processMetrics: false)
        let now = Date()
        m.networkProgrammed(triggeredAt: now.addingTimeInterval(2), committedAt: now)
        let p = try PrometheusText(m.exposition())
        #expect(p.value("hostnet_dnat_network_programming_duration_seconds_bucket", ["le": "0.001"]) == 1)
        #expect(p.value("hostnet_dnat_network_programming_duration_seconds_sum") == 0)
    }

    @Test func theTriggerTimeAnnotationParsesAsTheControllerWritesIt() {
        #expect(AgentMetrics.lastChangeTriggerTime("2026-12-01T14:11:19Z") == Date(timeIntervalSince1970: 1_796_134_279))
        let frac = AgentMetrics.lastChangeTriggerTime("2026-12-01T14:11:19.250Z")
        #expect(frac.map { abs($0.timeIntervalSince1970 - 1_796_134_279.25) < 1e-6 } == true)
        #expect(AgentMetrics.lastChangeTriggerTime("2026-12-01T16:11:19+02:00") == Date(timeIntervalSince1970: 1_796_134_279))
        for bad in [nil, "", "yesterday", "2026-13-01T00:00:00Z", "2026-12-01T14:11:19", "2026-12-01T14:11:19.Z", "2026-12-01T14:11:19Zjunk"] {
            #expect(AgentMetrics.lastChangeTriggerTime(bad) == nil, "\(String(describing: bad))")
        }
    }

    /// Process metrics against a second reading of the same facts (/proc/self/status, the clock, the fd table).
    @Test func processMetricsArePlausible() throws {
        guard FileManager.default.fileExists(atPath: "/proc/self/stat") else { return }
        let m = AgentMetrics()
        let p = try PrometheusText(m.exposition())
        let rss = try #require(p.value("process_resident_memory_bytes"))
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        let vmRSS = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") }
            .flatMap { Double($0.split(separator: " ", omittingEmptySubsequences: true)[1]) }.map { $0 * 1024 }
        let expected = try #require(vmRSS)
        #expect(rss > expected / 2 && rss < expected * 2, "rss \(rss) vs VmRSS \(expected)")
        let start = try #require(p.value("process_start_time_seconds"))
        let now = Date().timeIntervalSince1970
        #expect(start <= now + 1 && start > now - 86_400, "start \(start), now \(now)")
        #expect((p.value("process_open_fds") ?? 0) >= 3)
        #expect((p.value("process_max_fds") ?? 0) >= (p.value("process_open_fds") ?? .infinity))
        #expect(p.types["process_cpu_seconds_total"] == "counter")
        // CPU time only grows; burn a little and look again.
        let cpu1 = try #require(p.value("process_cpu_seconds_total"))
        var x = 0.0
        let until = Date().addingTimeInterval(0.1)
        while Date() < until { x += sin(x + 1) }
        #expect(x.isFinite)
        let cpu2 = try #require(try PrometheusText(m.exposition()).value("process_cpu_seconds_total"))
        #expect(cpu2 >= cpu1 && cpu2 > 0)
    }

    /// Cumulative buckets never decrease and `+Inf` equals `_count`, for every histogram series.
    func checkHistograms(_ p: PrometheusText) throws {
        for (name, type) in p.types where type == "histogram" {
            let buckets = p.series(name + "_bucket")
            let groups = Dictionary(grouping: buckets) { $0.labels.filter { $0.key != "le" } }
            #expect(!groups.isEmpty, "\(name) has no buckets")
            for (labels, series) in groups {
                let sorted = series.sorted { (Double($0.labels["le"]!) ?? .infinity) < (Double($1.labels["le"]!) ?? .infinity) }
                for (a, b) in zip(sorted, sorted.dropFirst()) { #expect(a.value <= b.value, "\(name) \(labels)") }
                #expect(sorted.last?.labels["le"] == "+Inf")
                #expect(sorted.last?.value == p.value(name + "_count", labels), "\(name) \(labels)")
            }
        }
    }
}
