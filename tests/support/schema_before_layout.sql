CREATE TABLE studies (
	study_uid VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	first_seen_at DATETIME NOT NULL, 
	last_instance_at DATETIME NOT NULL, 
	completed_at DATETIME, 
	completion_reason VARCHAR(16), 
	has_anterior BOOLEAN NOT NULL, 
	has_posterior BOOLEAN NOT NULL, 
	instance_count INTEGER NOT NULL, 
	late_instance_count INTEGER NOT NULL, 
	patient_key TEXT, 
	calling_ae VARCHAR(64) NOT NULL, 
	CONSTRAINT pk_studies PRIMARY KEY (study_uid), 
	CONSTRAINT ck_studies_state CHECK (state IN ('receiving', 'complete', 'classifying', 'classified', 'failed'))
);
CREATE INDEX ix_studies_state_last ON studies (state, last_instance_at);
CREATE TABLE model_versions (
	id INTEGER NOT NULL, 
	version VARCHAR(64) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	arch VARCHAR(64) NOT NULL, 
	weights_sha256 VARCHAR(64) NOT NULL, 
	file_sha256 VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	data_description TEXT NOT NULL, 
	metrics TEXT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	created_at DATETIME NOT NULL, 
	promoted_at DATETIME, 
	retired_at DATETIME, 
	rolled_back_at DATETIME, 
	note TEXT, 
	CONSTRAINT pk_model_versions PRIMARY KEY (id), 
	CONSTRAINT ck_model_versions_state CHECK (state IN ('candidate', 'serving', 'retired')), 
	CONSTRAINT uq_model_versions_version UNIQUE (version)
);
CREATE UNIQUE INDEX uq_model_versions_one_serving ON model_versions (state) WHERE state = 'serving';
CREATE TABLE instances (
	sop_uid VARCHAR(64) NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	series_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	transfer_syntax_uid VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	views VARCHAR(256) NOT NULL, 
	n_frames INTEGER NOT NULL, 
	size_bytes BIGINT NOT NULL, 
	received_at DATETIME NOT NULL, 
	calling_ae VARCHAR(64) NOT NULL, 
	late BOOLEAN NOT NULL, 
	CONSTRAINT pk_instances PRIMARY KEY (sop_uid), 
	CONSTRAINT fk_instances_study_uid_studies FOREIGN KEY(study_uid) REFERENCES studies (study_uid)
);
CREATE INDEX ix_instances_study_uid ON instances (study_uid);
CREATE TABLE jobs (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	claimed_by TEXT, 
	claimed_at DATETIME, 
	created_at DATETIME NOT NULL, 
	finished_at DATETIME, 
	error TEXT, 
	CONSTRAINT pk_jobs PRIMARY KEY (id), 
	CONSTRAINT ck_jobs_state CHECK (state IN ('pending', 'claimed', 'done', 'failed')), 
	CONSTRAINT fk_jobs_study_uid_studies FOREIGN KEY(study_uid) REFERENCES studies (study_uid)
);
CREATE UNIQUE INDEX uq_jobs_one_active ON jobs (study_uid, kind) WHERE state IN ('pending', 'claimed');
CREATE INDEX ix_jobs_claim ON jobs (state, kind, id);
CREATE TABLE purges (
	study_uid VARCHAR(64) NOT NULL, 
	purged_at DATETIME NOT NULL, 
	files INTEGER NOT NULL, 
	size_bytes BIGINT NOT NULL, 
	CONSTRAINT pk_purges PRIMARY KEY (study_uid), 
	CONSTRAINT fk_purges_study_uid_studies FOREIGN KEY(study_uid) REFERENCES studies (study_uid)
);
CREATE TABLE results (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	job_id INTEGER, 
	model_version TEXT NOT NULL, 
	model_sha256 TEXT NOT NULL, 
	predicted_class TEXT NOT NULL, 
	probabilities TEXT NOT NULL, 
	per_view TEXT NOT NULL, 
	sr_sop_uid VARCHAR(64) NOT NULL, 
	sr_series_uid VARCHAR(64) NOT NULL, 
	sr_path TEXT NOT NULL, 
	created_at DATETIME NOT NULL, 
	note TEXT, 
	CONSTRAINT pk_results PRIMARY KEY (id), 
	CONSTRAINT fk_results_study_uid_studies FOREIGN KEY(study_uid) REFERENCES studies (study_uid), 
	CONSTRAINT fk_results_job_id_jobs FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE INDEX ix_results_study_uid ON results (study_uid);
CREATE TABLE exports (
	id INTEGER NOT NULL, 
	result_id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	sr_sop_uid VARCHAR(64) NOT NULL, 
	destination VARCHAR(255) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at DATETIME NOT NULL, 
	claimed_by TEXT, 
	claimed_at DATETIME, 
	last_error TEXT, 
	last_status INTEGER, 
	created_at DATETIME NOT NULL, 
	acked_at DATETIME, 
	CONSTRAINT pk_exports PRIMARY KEY (id), 
	CONSTRAINT uq_exports_sr_destination UNIQUE (sr_sop_uid, destination), 
	CONSTRAINT ck_exports_state CHECK (state IN ('pending', 'sending', 'done', 'dead')), 
	CONSTRAINT fk_exports_result_id_results FOREIGN KEY(result_id) REFERENCES results (id), 
	CONSTRAINT fk_exports_study_uid_studies FOREIGN KEY(study_uid) REFERENCES studies (study_uid)
);
CREATE INDEX ix_exports_result_id ON exports (result_id);
CREATE INDEX ix_exports_claim ON exports (state, next_attempt_at);
